"""Seconds of the calibration stage's forward + statistics on the demo model, without the solver.

    python calib_stage.py LABEL NSAMPLES SEQLEN

Runs the calibration runner (``quantize_blocks``, GPTQ's path: one micro-batch, true-sequential) with a
cheap RTN solve (no MSE search) and prints ``total``, ``solve`` and their difference ``forward_and_stats``
as one JSON line.  To compare two versions of lowbit, run it with ``PYTHONPATH`` pointing at each.
"""
import json
import sys
import time

import torch

import lowbit.api as api
from lowbit.config import QuantConfig
from lowbit.data import calibration_windows, read_text, tokenize
from lowbit.models.arch import resolve_spec
from lowbit.models.sources import load_model
from lowbit.solvers import SOLVERS

label, n, T = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, tok, _ = load_model("smollm2-135m")
spec = resolve_spec(model)
windows = calibration_windows(tokenize(tok, read_text("default", split="calib")), n, T, 0)
cfg = QuantConfig(method="rtn", bits=4, group_size=64, mse=False)
t_solve = 0.0


def solve(W, H, name):
    global t_solve
    t0 = time.perf_counter()
    out = SOLVERS[cfg.method](W, None, cfg)
    t_solve += time.perf_counter() - t0
    return out


t0 = time.perf_counter()
api.quantize_blocks(model, spec, windows, solve, device="cpu", dtype=torch.float32, batch_size=n, progress=False)
total = time.perf_counter() - t0
print(json.dumps({"label": label, "threads": torch.get_num_threads(), "total": round(total, 1),
                  "solve": round(t_solve, 1), "forward_and_stats": round(total - t_solve, 1)}))
