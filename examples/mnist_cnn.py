"""PyTorch's MNIST example (pytorch/examples, mnist/main.py) with a ConvFixedPointLayer inserted
after the pooled second conv block; the loop, the optimizer (Adadelta, lr 1.0) and the schedule
are the example's own.

    python examples/mnist_cnn.py --layer w3 --data-root <root>      # the layer, trained by w3
    python examples/mnist_cnn.py --layer none --data-root <root>    # the example as it is

The layer records a backward's fault instead of raising it (``throw=False``), so the example's
loop goes on; the last line printed is JSON: test accuracy, the layer's recorded faults and how
often it scaled K back to its norm bound.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torchvision import datasets, transforms

from fprnn.models.conv import ConvFixedPointLayer


class Net(nn.Module):
    def __init__(self, rule: str | None):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.recurrent = None if rule is None else ConvFixedPointLayer(64, (12, 12), rule=rule, throw=False)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        if self.recurrent is not None:
            x = self.recurrent(x)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train(model, loader, optimizer, epoch, log_interval):
    model.train()
    for batch_idx, (data, target) in enumerate(loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        optimizer.step()
        if batch_idx % log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx * len(data)}/{len(loader.dataset)}]\tLoss: {loss.item():.6f}",
                  flush=True)


def test(model, loader) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            correct += int((model(data).argmax(1) == target).sum())
    return correct / len(loader.dataset)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=["none", "w3", "w1", "w2", "jfb"], default="w3")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--train-size", type=int, default=20000, help="the first this many training images")
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(args.data_root, train=True, download=args.download, transform=tf)
    test_set = datasets.MNIST(args.data_root, train=False, download=args.download, transform=tf)
    train_set = torch.utils.data.Subset(train_set, range(min(args.train_size, len(train_set))))
    test_set = torch.utils.data.Subset(test_set, range(min(args.test_size, len(test_set))))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
    model = Net(None if args.layer == "none" else args.layer)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=args.lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=args.gamma)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train(model, train_loader, optimizer, epoch, args.log_interval)
        scheduler.step()
    layer = model.recurrent
    out = {"layer": args.layer, "test_acc": test(model, test_loader), "train_images": len(train_set),
           "epochs": args.epochs, "faults": None if layer is None else len(layer.faults),
           "rescaled": None if layer is None else layer.rescaled, "wall_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
