"""Run under torchrun by tests/test_train.py: checks that stages.average_gradients turns per-rank
shard gradients into the gradient of the mean loss over the GLOBAL batch, computed here
independently on the full batch by every rank. Writes one JSON line per rank to the file named in
argv[1]."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import stages  # noqa: E402
import train  # noqa: E402

rank, world, device = train.setup_distributed("cpu")
torch.manual_seed(0)                       # same model and same global batch on every rank
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)

# oracle: full-batch gradient on one process
full = [g.clone() for g in torch.autograd.grad((model(x) - y).pow(2).mean(),
                                              list(model.parameters()))]

# DDP arithmetic: each rank its strided shard (as DistributedSampler deals), then the all-reduce
xs, ys = x[rank::world], y[rank::world]
model.zero_grad()
(model(xs) - ys).pow(2).mean().backward()
stages.average_gradients(list(model.parameters()), world)
err = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), full))
with open(f"{sys.argv[1]}.{rank}", "w") as f:
    f.write(json.dumps({"rank": rank, "world": world, "max_err": err}) + "\n")
dist.destroy_process_group()
