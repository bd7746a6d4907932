"""Run vLLM's CPU build (its own venv) on a model folder: record what its sharded_state loader
expects, or load and generate. Run with vLLM's Python, never reshard's (reshard does not
depend on vLLM):

    VLLM_PY=~/.cache/reshard/vllm-0.32/bin/python
    $VLLM_PY scripts/vllm_contract.py keys MODEL --tp 2 [--pp 2] [--ep] -o golden.json
    $VLLM_PY scripts/vllm_contract.py run MODEL[:FORMAT] [MODEL[:FORMAT] ...] --tp 2 [--load-only]

`keys` starts the engine with load_format=sharded_state on a folder holding only config.json:
the loader writes its state dict (keys, shapes, dtypes, per pp/tp rank) through
scripts/vllm/sitecustomize.py before it looks for files, then fails for want of them.
`run` loads each model in turn (load format `auto` unless given, e.g. `out/:sharded_state`)
and prints one line `RESULT {json}` for each: greedy token ids and their logprobs per prompt
(none with --load-only). Every line vLLM logs goes to stdout too, so a caller can
look for its warnings ("loading tensor of shape ...").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = [[5, 17, 33], [9, 2, 44, 71, 3], [60, 8, 15, 27, 90, 4, 11]]  # distinct lengths


def _engine_env(tp: int) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % 2) for i in range(tp)))


def _llm(model: str, args, load_format: str):
    from vllm import LLM

    return LLM(
        model=model,
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        enable_expert_parallel=args.ep,
        load_format=load_format,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype=args.dtype,
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
    )


def keys(args) -> int:
    """The loader's expected state dict per rank, from vLLM itself."""
    dump = Path(tempfile.mkdtemp(prefix="reshard-vllm-keys-"))
    os.environ["RESHARD_VLLM_DUMP"] = str(dump)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "vllm"), os.environ["PYTHONPATH"]])
    folder = Path(tempfile.mkdtemp(prefix="reshard-vllm-model-"))
    (folder / "config.json").write_bytes((Path(args.model) / "config.json").read_bytes())
    # the workers are spawned: they import sitecustomize from PYTHONPATH; this process re-execs
    os.execv(
        sys.executable, [sys.executable, __file__, "_keys", str(folder), str(dump), *sys.argv[3:]]
    )


def _keys_child(args, folder: str, dump: str) -> int:
    import vllm

    try:
        _llm(folder, args, "sharded_state")
    except Exception as e:  # expected: no checkpoint files in the folder
        print("engine stopped:", str(e).splitlines()[0][:200])
    ranks = {p.stem: json.loads(p.read_text()) for p in sorted(Path(dump).glob("*.json"))}
    if not ranks:
        print("error: the loader wrote no state dict; see the log above", file=sys.stderr)
        return 1
    doc = {
        "vllm": vllm.__version__,
        "architecture": json.loads((Path(folder) / "config.json").read_text())["architectures"][0],
        "layout": {"tp": args.tp, "pp": args.pp, "ep": args.ep},
        "ranks": ranks,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {len(ranks)} ranks, {sum(map(len, ranks.values()))} keys")
    return 0


def run(args) -> int:
    """Each MODEL[:LOAD_FORMAT] in turn in this one process (vLLM's import is paid once)."""
    import gc

    from vllm import SamplingParams

    for spec in [args.model, *args.more]:
        model, _, load_format = spec.partition(":")
        start = time.perf_counter()
        llm = _llm(model, args, load_format or args.load_format)
        result: dict = {"model": spec, "start_s": round(time.perf_counter() - start, 1)}
        if not args.load_only:
            params = SamplingParams(
                temperature=0, max_tokens=args.max_tokens, logprobs=1, detokenize=False
            )
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
            result["outputs"] = [_output(o.outputs[0]) for o in outs]
        print("RESULT " + json.dumps(result), flush=True)
        del llm
        gc.collect()
    return 0


def _output(out) -> dict:
    return {
        "ids": list(out.token_ids),
        "logprobs": [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)],
    }


def _with_stubs() -> None:
    """vllm_stubs/ (an empty torchvision for Qwen3.5's import) in this process and every one
    vLLM starts: its registry's inspection subprocess and the spawned workers."""
    stubs = str(HERE / "vllm_stubs")
    sys.path.insert(0, stubs)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [stubs] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    )


def main() -> int:
    _with_stubs()
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["keys", "run", "_keys"])
    p.add_argument("model")
    p.add_argument("more", nargs="*", help="run: more MODEL[:LOAD_FORMAT]; _keys: the dump folder")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--load-only", action="store_true")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("-o", "--out")
    args = p.parse_args()
    _engine_env(args.tp * args.pp)
    if args.mode == "keys":
        return keys(args)
    if args.mode == "_keys":
        return _keys_child(args, args.model, args.more[0])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
