"""After training: fixed points and their stability (``fixed_points``), figures of runs and sweeps
(``figures``, ``trial_figures``) and loss landscapes (``landscape``)."""
