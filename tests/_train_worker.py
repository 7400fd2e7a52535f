"""Run by tests/test_train.py under `accelerate launch`: train, then write each rank's parameter hash."""

import hashlib
import os
import sys

import torch

from rag.config import load_config
from rag.train import TrainConfig, train

if __name__ == "__main__":
    cfg = load_config(TrainConfig, sys.argv[1])
    done = train(cfg, progress=False)
    rank = int(os.environ.get("RANK", 0))
    h = hashlib.sha256()  # this rank's own parameters after training
    for _, p in sorted(done.pipeline.model.retriever.encoder.named_parameters()):
        h.update(p.detach().to(torch.float32).numpy().tobytes())
    with open(f"{cfg.output_dir}/rank{rank}.txt", "w") as f:
        f.write(h.hexdigest())
