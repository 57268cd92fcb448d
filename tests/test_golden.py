"""Golden hashes: the files every method writes (and their GGUF / GPTQ exports) on the tiny models stay
byte-identical across refactors.

The hashes in ``tests/data/golden_hashes.json`` were recorded before the one-method-one-file redesign (issue
#15) with ``python tests/test_golden.py --write`` on this project's CI machine type (2 threads, torch 2.13 CPU).
A change that alters results on purpose (a new default, a faster summation order) re-records them in the same
commit and says why.  What is hashed: ``model.safetensors``, the per-layer records of ``lowbit.json``
(``layers``: formats, bits, losses) and every file of the exports; not the run record or the settings block.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "data" / "golden_hashes.json"
FAMILIES = ("llama", "qwen3", "gemma3")
CALIB = ["--nsamples", "8", "--seqlen", "64"]
CASES = {  # name: the CLI flags of `lowbit quantize` (after MODEL --calib TEXT --out OUT), and the exports it takes
    "rtn-w4g32": (["--method", "rtn", "--bits", "4", "--group-size", "32"], ("gguf", "gptq")),
    "rtn-w3g32-sym": (["--method", "rtn", "--bits", "3", "--group-size", "32", "--sym"], ("gptq",)),
    "gptq-w4g32": (["--method", "gptq", "--bits", "4", "--group-size", "32", *CALIB], ("gguf", "gptq")),
    "gptq-w3g32-noact": (["--method", "gptq", "--bits", "3", "--group-size", "32", "--no-act-order", *CALIB], ()),
    "foem-w4g32": (["--method", "foem", "--bits", "4", "--group-size", "32", *CALIB], ("gguf",)),
    "gwq-w3g32": (["--method", "gwq", "--bits", "3", "--group-size", "32", "--grad-samples", "4", *CALIB], ()),
    "gwq-hessian": (["--method", "gwq", "--bits", "3", "--group-size", "32", "--saliency", "hessian", *CALIB], ()),
    "squeeze": (["--method", "squeeze", "--group-size", "32", *CALIB], ()),
    "quip-2bit": (["--method", "quip", "--bits", "2", *CALIB], ()),
    "quip-4bit-ft": (["--method", "quip", "--bits", "4", "--finetune", "--ft-steps", "2", *CALIB], ()),
    "dlqat-w3g32": (["--method", "dlqat", "--bits", "3", "--group-size", "32", "--steps", "2", "--lora-rank", "4",
                     "--seqlen", "64"], ()),
    "gguf-q4_0": (["--method", "gptq", "--gguf-type", "Q4_0", *CALIB], ("gguf",)),
    "head-bits": (["--method", "rtn", "--bits", "4", "--group-size", "32", "--head-bits", "4"], ()),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def _folder_hashes(folder: Path) -> dict:
    return {p.name: _sha(p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def hashes_of(model: Path, text: Path, case: str, tmp: Path, family: str) -> dict:
    """``{file: sha256 prefix}`` of one golden case: the checkpoint's weights and layer records, its exports."""
    from lowbit.cli import main

    flags, exports = CASES[case]
    out = tmp / case
    calib = [] if "rtn" in flags else ["--calib", str(text)]
    assert main(["quantize", str(model), *calib, *flags, "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "lowbit.json").read_text())
    got = {"model.safetensors": _sha((out / "model.safetensors").read_bytes()),
           "lowbit.json:layers": _sha(json.dumps(meta["layers"], sort_keys=True).encode())}
    for fmt in exports:
        if fmt == "gguf" and family == "gemma3":  # the tiny gemma3 config is not llama.cpp's gemma3 graph
            continue
        dst = tmp / f"{case}.{fmt}"
        target = dst.with_suffix(".gguf") if fmt == "gguf" else dst
        assert main(["export", str(out), "--format", fmt, "--out", str(target)]) == 0
        if fmt == "gguf":
            got["export.gguf"] = _sha(target.read_bytes())
        else:
            got.update({f"export.{fmt}/{k}": v for k, v in _folder_hashes(target).items()})
    return got


@pytest.fixture(autouse=True)
def _two_threads():
    """The hashes were recorded with 2 threads (the CI machine's cores); the thread count changes BLAS sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.e2e)  # fast tier: llama
                                    for f in FAMILIES])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_are_byte_identical_to_the_recorded_ones(case, family, tiny_models, tiny_text, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    key = f"{family}/{case}"
    assert key in golden, f"no recorded hashes for {key}: run python tests/test_golden.py --write"
    assert hashes_of(tiny_models[family], tiny_text, case, tmp_path, family) == golden[key]


def _write() -> None:
    """Record the hashes of every case (run before a refactor; see the module docstring)."""
    import tempfile

    sys.path.insert(0, str(HERE))
    from helpers import FAMILIES as ALL, build_tiny_model, make_text  # noqa: F401

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        text = root / "calib.txt"
        text.write_text(make_text())
        golden = {}
        for family in FAMILIES:
            model = build_tiny_model(family, root / family, text.read_text())
            for case in sorted(CASES):
                golden[f"{family}/{case}"] = hashes_of(model, text, case, root / "runs" / family, family)
                print(family, case, flush=True)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden.py --write")
    _write()
