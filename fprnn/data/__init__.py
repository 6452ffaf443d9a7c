"""Lightning data modules: image sets and arrays (``datamodules``, ``vision``), tasks in time
(``tasks``), mazes (``mazes``) and an SSN teacher's responses (``ssn``)."""
