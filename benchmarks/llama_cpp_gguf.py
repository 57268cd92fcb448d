"""lowbit's GGUF against llama.cpp's own quantizer (issue #16, part 7): same types and sizes, ppl, KLD, speed.

For each ``--types`` entry (a llama.cpp file type as ``llama-quantize`` spells it: Q4_0, Q4_K_M, IQ2_XS…):

* ``llama-quantize``: the float GGUF of the demo model (``llama-quantize --allow-requantize … F32`` of its Q4_1
  file) quantized without and with an importance matrix (``llama-imatrix`` on the calibration plays, the same
  windows size lowbit calibrates on); a type llama-quantize refuses without one (IQ2_XS…) has that row left out;
* lowbit, per method in ``--methods``: ``lowbit quantize --method M --gguf-type P`` with ``P`` lowbit's spelling of
  the same preset (``MOSTLY_Q4_0``, ``Q4_K_M``, ``MOSTLY_IQ2_XS``: every tensor, embedding and head included, gets
  llama-quantize's type; ``--pure``: the plain type on every linear, the embedding float), then
  ``lowbit export --format gguf``.  The column "same types as llama.cpp" compares the file's tensor types with
  llama-quantize's +imatrix file (``gguf.GGUFReader``; the differences go to stderr);
* ``--target-bpw M``: lowbit ``--method M --target-bpw B`` with ``B`` the most bits per weight that keep lowbit's
  file no larger than llama-quantize+imatrix's (:func:`budget_bpw`), the embedding on llama-quantize's type.

Every file is scored by ``llama-perplexity`` on the evaluation plays (its protocol: windows of ``--ctx``, the
second half of each scored), with the KL divergence of its next-token distributions from the float GGUF's
(``--kl-divergence-base``), by ``lowbit eval FILE.gguf`` (lowbit's own evaluator: the same ``--chunks`` windows of
``--ctx``, every token scored) and, with ``--bench``, by ``llama-bench`` (prompt and decode tok/s; run it on a
quiet machine).  "gap" is lowbit's ppl gap to F32 over llama-quantize+imatrix's (llama-perplexity).

    python benchmarks/llama_cpp_gguf.py [--types Q4_0,Q4_K_M] [--methods gptq,foem] [--target-bpw gptq]
        [--nsamples 32] [--chunks 16] [--threads 1] [--work DIR] [--bench]

Finished steps in ``--work`` are reused (files, and the quality scores of a file: ``NAME.scores.json``); timings
never are.  The llama.cpp binaries come from PATH (or ``$LOWBIT_LLAMA_CPP_BIN``); ``../shared/docs/peers.md``
says how to build them from the sources vendored in the llama-cpp-python sdist.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import lowbit as cli


HEADER_SLACK = 1 << 16  # bytes: lowbit's GGUF header may be a little larger than llama-quantize's (~0.004 bpw here)


class Failed(RuntimeError):
    pass


def binary(name: str) -> str:
    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    found = str(Path(env) / name) if env and (Path(env) / name).is_file() else shutil.which(name)
    if not found:
        sys.exit(f"llama_cpp_gguf.py: {name} not found (PATH or $LOWBIT_LLAMA_CPP_BIN); see ../shared/docs/peers.md")
    return found


def run(*cmd, stdout_only: bool = False) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        raise Failed(f"{' '.join(map(str, cmd[:3]))} … failed:\n{r.stderr[-3000:]}")
    return r.stdout if stdout_only else r.stdout + r.stderr


def parse_perplexity(out: str) -> dict:
    """llama-perplexity's log -> its final ppl, mean KLD and top-1 agreement (%) (None where a line is missing)."""
    num = r"([-+0-9.eE]+)"
    ppl = re.search(rf"Mean PPL\(Q\)\s*:\s*{num}", out) or re.search(rf"Final estimate: PPL = {num}", out)
    kld = re.search(rf"Mean\s+KLD:\s*{num}", out)
    top1 = re.search(rf"Same top p:\s*{num}", out)
    return {"ppl": float(ppl.group(1)) if ppl else None, "kld": float(kld.group(1)) if kld else None,
            "same_top_pct": float(top1.group(1)) if top1 else None}


def parse_bench(out: str) -> dict:
    """``llama-bench -o json`` -> ``{"pp_tps", "tg_tps"}``: mean tok/s of the prompt (n_gen 0) and decode
    (n_prompt 0) tests (None where absent)."""
    got = {"pp_tps": None, "tg_tps": None}
    for t in json.loads(out[out.index("["):]):
        key = "pp_tps" if t["n_gen"] == 0 else "tg_tps" if t["n_prompt"] == 0 else None
        if key:
            got[key] = float(t["avg_ts"])
    return got


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def type_diff(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """``"name: ours vs theirs"`` for every tensor whose type differs, or that only one file has (``-``)."""
    return [f"{n}: {ours.get(n, '-')} vs {theirs.get(n, '-')}" for n in sorted(set(ours) | set(theirs))
            if ours.get(n) != theirs.get(n)]


def layout(path: Path) -> tuple[int, int]:
    """``(weights, tensor bytes)`` of a GGUF file: every tensor's element count and data bytes."""
    import gguf

    ts = gguf.GGUFReader(str(path)).tensors
    return sum(int(t.n_elements) for t in ts), sum(int(t.n_bytes) for t in ts)


def budget_bpw(limit_bytes: int, overhead_bytes: int, weights: int) -> float:
    """The largest ``--target-bpw`` (4 decimals, rounded down) whose tensors, with ``overhead_bytes`` of header
    and padding, fit in ``limit_bytes``: ``B = 8·(limit − overhead) / N``, N = every tensor's weights (as
    lowbit.gguf.budget counts them: the file's bits over all weights)."""
    return math.floor(8 * (limit_bytes - overhead_bytes) / weights * 1e4) / 1e4


def lowbit_name(t: str, pure: bool) -> str:
    """lowbit's ``--gguf-type`` for llama-quantize's type name ``t``: the same preset (``Q4_0`` -> ``MOSTLY_Q4_0``,
    ``Q4_K_M`` as it is), or with ``pure`` the one type on every linear (a preset's default type)."""
    from lowbit.gguf import canonical, is_preset
    from lowbit.gguf.embedding import file_type
    from lowbit.gguf.presets import DEFAULT

    if pure:
        name = canonical(t)
        return DEFAULT[name] if is_preset(name) else name
    return canonical(file_type(t))


def refit_rounds(method: str, given: int | None, **grid) -> int:
    """``--gguf-refit`` as ``given``, else lowbit's default for ``method`` on the row's ``grid`` (``gguf_type=T``
    or ``target_bpw=B``; lowbit's config decides, and refuses a method the grid does not take)."""
    if given is not None:
        return given
    from lowbit.config import QuantConfig

    return QuantConfig(method=method, **grid).gguf_refit


def scores(gguf: Path, a, base: Path) -> dict:
    """llama-perplexity's and lowbit eval's scores of ``gguf`` (cached next to it), and llama-bench's with --bench."""
    cache, st = gguf.with_suffix(".scores.json"), gguf.stat()
    key = [st.st_size, st.st_mtime_ns, a.ctx, a.chunks]
    got = json.loads(cache.read_text()) if cache.is_file() else {}
    if got.get("key") != key:
        got = {"key": key, **perplexity(gguf, a.text, a.ctx, a.chunks, base, a.threads)}
        ev = gguf.with_suffix(".eval.json")
        subprocess.run([sys.executable, "-m", "lowbit", "eval", gguf, "--text", a.text, "--seqlen", str(a.ctx),
                        "--max-tokens", str(a.ctx * a.chunks), "--json", ev, "--quiet", "--force"],
                       check=True, stdout=sys.stderr)  # its summary line would break the table on stdout
        got["lowbit_ppl"] = json.loads(ev.read_text())["ppl"]
        if got["ppl"] is not None:
            cache.write_text(json.dumps(got) + "\n")
    got = {k: v for k, v in got.items() if k != "key"}
    if a.bench:  # never cached: timings belong to the machine and the moment
        got.update(parse_bench(run(binary("llama-bench"), "-m", gguf, "-p", a.bench_prompt, "-n", a.bench_gen,
                                   "-t", a.bench_threads, "-r", a.bench_reps, "-o", "json", stdout_only=True)))
    return got


def perplexity(gguf: Path, text: Path, ctx: int, chunks: int, base: Path, threads: int) -> dict:
    """llama-perplexity's final ppl and, against the float logits in ``base``, its mean KLD and top-1 agreement."""
    return parse_perplexity(run(binary("llama-perplexity"), "-m", gguf, "-f", text, "-c", ctx, "--chunks", chunks,
                                "-t", threads, "--kl-divergence-base", base, "--kl-divergence"))


def write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q4_1,IQ4_NL,Q4_K_M,Q3_K_M,Q2_K,IQ3_XXS,IQ2_XS",
                    help="llama-quantize type names; lowbit gets the same preset (or with --pure the plain type)")
    ap.add_argument("--methods", default="gptq", help="lowbit methods, comma-separated (gptq, foem, rtn)")
    ap.add_argument("--target-bpw", default="", metavar="METHODS",
                    help="also these methods with --target-bpw at llama-quantize+imatrix's file size, comma-separated")
    ap.add_argument("--bpw-candidates", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,IQ4_NL,IQ4_XS,Q5_0,IQ3_XXS,IQ3_S,"
                                                "IQ2_XS,IQ2_S",
                    help="--target-bpw: the types lowbit chooses from (not Q4_1 by default: the demo's weights "
                         "already sit on its grid, so it would find them back losslessly; the I-quants so that "
                         "the 2-3-bit sizes are reachable); part of the cache name (lowbit measures them once "
                         "for every size: $LOWBIT_CACHE/bpw-errors)")
    ap.add_argument("--lowbit-args", default="", help="more lowbit quantize flags for the method rows "
                                                      "(e.g. '--damp 0.1'); part of the row's name")
    ap.add_argument("--gguf-refit", type=int, default=None, metavar="N",
                    help="lowbit's --gguf-refit for the method rows (default: lowbit's own default for the method, "
                         "1 for gptq/foem/quip/awq); part of the row's name when not 0")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (lowbit and llama-imatrix)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity and lowbit eval window")
    ap.add_argument("--chunks", type=int, default=16, help="llama-perplexity and lowbit eval windows scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", action="store_true", help="lowbit with the preset of each name (the default now; "
                                                             "kept for old command lines)")
    ap.add_argument("--pure", action="store_true", help="lowbit with the plain type on every linear "
                                                          "(llama-quantize --pure), the embedding float")
    ap.add_argument("--bench", action="store_true", help="also llama-bench's prompt and decode tok/s of every file")
    ap.add_argument("--bench-prompt", type=int, default=128)
    ap.add_argument("--bench-gen", type=int, default=64)
    ap.add_argument("--bench-threads", type=int, default=2)
    ap.add_argument("--bench-reps", type=int, default=3)
    ap.add_argument("--work", default="gguf-bench", help="working folder (kept; finished steps are reused)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from lowbit.data.text import read_text
    from lowbit.models.sources import demo_gguf_path

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, a.text = work / "calib.txt", work / "eval.txt"
    write_if_changed(calib, read_text("default", split="calib"))
    write_if_changed(a.text, read_text("default", split="eval"))
    f32 = work / "f32.gguf"
    if not f32.is_file():
        run(binary("llama-quantize"), "--allow-requantize", demo_gguf_path(), f32, "F32")
    base = work / "f32.kld"
    if not base.is_file():
        run(binary("llama-perplexity"), "-m", f32, "-f", a.text, "-c", a.ctx, "--chunks", a.chunks,
            "-t", a.threads, "--kl-divergence-base", base)
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        run(binary("llama-imatrix"), "-m", f32, "-f", calib, "-c", a.seqlen, "--chunks", a.nsamples,
            "-t", a.threads, "-o", imatrix)

    def row(name: str, path: Path, **extra) -> dict:
        rows.append({"name": name, "mb": path.stat().st_size / 1e6, **extra, **scores(path, a, base)})
        print(rows[-1], file=sys.stderr, flush=True)
        return rows[-1]

    def lowbit_file(stem: str, args: list[str], method: str, **grid) -> tuple[Path, str]:
        """The exported GGUF of ``lowbit quantize … args`` (cached under ``stem``, which names the refit rounds),
        and the rounds' part of the row's name; ``grid`` as :func:`refit_rounds` takes it."""
        r = refit_rounds(method, a.gguf_refit, **grid)
        refit = f" --gguf-refit {r}" if r else ""
        stem += f"-refit{r}" if r else ""
        args = [*args, "--gguf-refit", str(r)]
        ckpt, out = work / stem, work / f"{stem}.gguf"
        if not (ckpt / "lowbit.json").is_file():
            cli("quantize", "smollm2-135m", *args, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                "--out", str(ckpt))
        if not out.is_file():
            cli("export", str(ckpt), "--format", "gguf", "--out", str(out))
        return out, refit

    def compare(out: Path, theirs: Path, ref: dict) -> dict:
        diff = type_diff(tensor_types(out), tensor_types(theirs))
        for d in diff:
            print(f"  {out.name} vs {theirs.name}: {d}", file=sys.stderr)
        gap = None
        if None not in (rows[-1]["ppl"], ref["ppl"], fp["ppl"]) and ref["ppl"] != fp["ppl"]:
            gap = (rows[-1]["ppl"] - fp["ppl"]) / (ref["ppl"] - fp["ppl"])
        rows[-1].update(same_types="yes" if not diff else f"{len(diff)} differ", gap=gap,
                        no_larger=out.stat().st_size <= theirs.stat().st_size)
        return rows[-1]

    rows: list[dict] = []
    fp = row("F32 (llama.cpp)", f32)
    extra = a.lowbit_args.split()
    tag = "".join(c for c in a.lowbit_args.replace(" ", "") if c.isalnum() or c in "._")
    for t in [s for s in a.types.split(",") if s]:
        ref = None
        for imx in (False, True):
            out = work / f"llama-{t}{'-imatrix' if imx else ''}.gguf"
            try:
                if not out.is_file():
                    run(binary("llama-quantize"), *(["--imatrix", imatrix] if imx else []), f32, out, t)
            except Failed as e:
                if imx:
                    raise
                print(f"llama-quantize {t} without an imatrix: left out ({str(e).splitlines()[-1][:200]})",
                      file=sys.stderr)
                continue
            ref = row(f"llama-quantize {t}{' + imatrix' if imx else ''}", out)
        theirs = work / f"llama-{t}-imatrix.gguf"
        ours = lowbit_name(t, a.pure)
        for method in [m for m in a.methods.split(",") if m]:
            out, refit = lowbit_file(f"lowbit-{method}-{ours}{'-' + tag if tag else ''}",
                                     ["--method", method, "--gguf-type", ours, *extra], method, gguf_type=ours)
            row(f"lowbit {method} --gguf-type {ours}{refit} {a.lowbit_args}".strip(), out)
            compare(out, theirs, ref)
        weights, theirs_bytes = layout(theirs)  # header and padding: llama-quantize's, plus HEADER_SLACK for lowbit's
        overhead = theirs.stat().st_size - theirs_bytes + HEADER_SLACK
        bpw, emb = budget_bpw(theirs.stat().st_size, overhead, weights), tensor_types(theirs)["token_embd.weight"]
        for method in [m for m in a.target_bpw.split(",") if m]:
            try:
                cands = hashlib.sha256(a.bpw_candidates.encode()).hexdigest()[:8]
                out, refit = lowbit_file(f"lowbit-{method}-bpw{bpw:.4f}-{emb}-{cands}",
                                         ["--method", method, "--target-bpw", f"{bpw:.4f}", "--embedding-type", emb,
                                          "--bpw-candidates", a.bpw_candidates], method, target_bpw=bpw)
            except subprocess.CalledProcessError:
                print(f"lowbit {method} --target-bpw {bpw:.4f} ({t}'s size): refused, left out", file=sys.stderr)
                continue
            row(f"lowbit {method} --target-bpw {bpw:.4f}{refit} --bpw-candidates {a.bpw_candidates} ({t}'s size)", out)
            compare(out, theirs, ref)

    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    print(f"\nllama-perplexity and lowbit eval, {a.chunks} windows of {a.ctx} on the evaluation plays; KLD vs the "
          "F32 GGUF; types and gap vs llama-quantize + imatrix\n")
    speed = " pp tok/s | tg tok/s |" if a.bench else ""
    print(f"| file | MB | same types as llama.cpp | ppl | mean KLD | same top-1 % | lowbit eval ppl | gap |{speed}")
    print("|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if a.bench else ""))
    for r in rows:
        mb = f"{r['mb']:.1f}" + ("" if r.get("no_larger", True) else " (larger)")
        print(f"| {r['name']} | {mb} | {r.get('same_types', '–')} | {fmt(r['ppl'], '.3f')} | "
              f"{fmt(r['kld'], '.4f')} | {fmt(r['same_top_pct'], '.2f')} | {fmt(r['lowbit_ppl'], '.3f')} | {fmt(r.get('gap'), '.2f')} |"
              + (f" {fmt(r['pp_tps'], '.1f')} | {fmt(r['tg_tps'], '.1f')} |" if a.bench else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        sys.exit(f"llama_cpp_gguf.py: {e}")
