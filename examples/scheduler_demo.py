"""A catalogue patch in a real vLLM engine, enabled by nothing but ``VLLM_CUSTOM_PATCHES``.

Runs the same requests through a real vLLM engine (the CPU build, a tiny Llama
with random weights, no download) twice, each in a fresh process with vLLM's
default multiprocess engine:

1. unpatched: vLLM serves waiting requests first come, first served;
2. with ``VLLM_CUSTOM_PATCHES=shortest_prompt_first,scheduler_trace`` in the
   child's environment only: vLLM's plugin loader applies the patches in
   every vLLM process, and the scheduler -- in the EngineCore process --
   admits the shortest waiting prompt first and traces every step.

Then prints the order requests were served in, what the patch changed, and
which process wrote the trace.

Run:  python examples/scheduler_demo.py [--policy fair_share]
(needs vLLM: ``make vllm``; ``make demo`` does both.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENGINE_ARGS: dict[str, Any] = {"max_num_seqs": 1, "enable_prefix_caching": False}
"""One request at a time, so requests are served strictly in the order they are admitted."""

# (id, prompt tokens, max new tokens, tenant).  "head" arrives first and is
# admitted alone; the others queue up behind it while it decodes, and the
# scheduling policy decides their order.
REQUESTS: dict[str, list[tuple[str, int, int, str]]] = {
    "shortest_prompt_first": [
        ("head", 3, 24, ""), ("long", 60, 4, ""), ("medium", 30, 4, ""),
        ("tiny", 4, 4, ""), ("short", 12, 4, ""), ("long2", 50, 4, ""),
    ],
    "fair_share": [("head", 3, 24, "")]
    + [(f"alice{i}", 8, 4, "alice") for i in range(4)]
    + [(f"bob{i}", 8, 4, "bob") for i in range(4)],
}  # fmt: skip


# -- the child: one engine, the requests, the order they finish in --------------------


def child(spec_path: str, out_path: str) -> None:
    import psutil
    import vllm

    from vllm_custom_patches import PatchManager
    from vllm_custom_patches.testing import ENGINE_KWARGS

    spec = json.loads(Path(spec_path).read_text())
    llm = vllm.LLM(model=spec["model"], skip_tokenizer_init=True, **ENGINE_KWARGS, **ENGINE_ARGS)
    engine = llm.llm_engine
    for index, (rid, length, max_tokens, tenant) in enumerate(spec["requests"]):
        params = vllm.SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args={"tenant": tenant} if tenant else None
        )
        prompt = [10 + (index * 37 + k * 13) % 980 for k in range(length)]
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    finished: list[str] = []
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished.append(output.request_id)
                outputs[output.request_id] = list(output.outputs[0].token_ids)
    processes = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            name = proc.name()
            if "resource_tracker" in " ".join(proc.cmdline()):
                name += " (multiprocessing resource tracker)"
            processes[proc.pid] = {"name": name, "ppid": proc.ppid()}
        except psutil.Error:
            pass
    result = {"pid": os.getpid(), "finished": finished, "outputs": outputs, "processes": processes,
              "applied_here": PatchManager.applied()}  # fmt: skip
    Path(out_path).write_text(json.dumps(result))


# -- the demo ----------------------------------------------------------------------------


def run_engine(workdir: Path, model: Path, requests: list[Any], patches: dict[str, str]) -> dict[str, Any]:
    from vllm_custom_patches.testing import ENGINE_ENV

    workdir.mkdir()
    spec, out, log = workdir / "spec.json", workdir / "result.json", workdir / "vllm.log"
    spec.write_text(json.dumps({"model": str(model), "requests": requests}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_CUSTOM_PATCHES")}
    env.update(ENGINE_ENV)
    env.update(VLLM_CACHE_ROOT=str(model.parent / "cache"), VLLM_RPC_BASE_PATH=str(model.parent / "rpc"))
    env.update(patches)  # the only difference between the two runs
    with open(log, "wb") as log_file:
        done = subprocess.run([sys.executable, __file__, "--child", str(spec), str(out)], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"the engine process failed ({done.returncode}); its log:\n{log.read_text()[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--policy", choices=sorted(REQUESTS), default="shortest_prompt_first")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, trace)")
    args = parser.parse_args()

    from vllm_custom_patches import PatchManager, detect_vllm_version
    from vllm_custom_patches.testing import write_tiny_model
    from vllm_custom_patches_catalogue.scheduler_trace import read_trace

    root = Path(tempfile.mkdtemp(prefix="vcp-demo-"))
    (root / "rpc").mkdir()
    model = write_tiny_model(root / "model", tokenizer=False)
    requests = REQUESTS[args.policy]
    trace_file = root / "trace.jsonl"
    selected = f"{args.policy},scheduler_trace"
    sizes = {rid: (length, tenant) for rid, length, _, tenant in requests}

    def label(rid: str) -> str:
        length, tenant = sizes[rid]
        return f"{rid} ({length} tok{', ' + tenant if tenant else ''})"

    print(f"vLLM {detect_vllm_version()}; tiny Llama with dummy weights in {model}")
    print(f"{len(requests)} requests, submitted in this order, to an engine that runs one at a time:")
    print("  " + ", ".join(label(rid) for rid, *_ in requests))
    print("  (head is admitted at once; the others queue behind it, and the policy orders them)")
    runs = {}
    for step, (name, patches) in enumerate(
        [
            ("unpatched", {}),
            ("patched", {"VLLM_CUSTOM_PATCHES": selected, "VLLM_CUSTOM_PATCHES_TRACE_FILE": str(trace_file)}),
        ],
        start=1,
    ):
        shown = " ".join(f"{k}={v}" for k, v in patches.items()) or "no VLLM_CUSTOM_PATCHES"
        print(f"[{step}/2] {name} engine ({shown}) ...", end=" ", flush=True)
        started = time.monotonic()
        runs[name] = run_engine(root / name, model, requests, patches)
        print(f"{time.monotonic() - started:.0f} s")

    before, after = runs["unpatched"], runs["patched"]
    width = max(len(label(rid)) for rid in sizes) + 2
    print(f"\n{'served':>7}  {'unpatched (vLLM: first come, first served)':<{max(width, 44)}}patched ({args.policy})")
    for i, (a, b) in enumerate(zip(before["finished"], after["finished"], strict=True), start=1):
        mark = "" if a == b else "  <- moved"
        print(f"{i:>7}  {label(a):<{max(width, 44)}}{label(b):<{width}}{mark}".rstrip())
    moved = [rid for i, rid in enumerate(after["finished"]) if before["finished"][i] != rid]
    same_tokens = before["outputs"] == after["outputs"]
    print(f"\nWhat changed: {len(moved)} of {len(requests)} requests were served in a different place;")
    if args.policy == "shortest_prompt_first":
        print("  waiting requests were admitted shortest prompt first instead of in arrival order.")
    else:
        print("  the tenants' queued requests were admitted alternately instead of alice's burst first.")
    print(f"  Output tokens identical in both runs: {same_tokens} (the patch changes the order, not the results).")

    trace = read_trace(trace_file)
    pids = sorted({line["pid"] for line in trace})
    procs = {int(pid): info for pid, info in after["processes"].items()}
    print(f"\nWhere the patch ran: the demo (pid {os.getpid()}) never applied anything here "
          f"(PatchManager.applied() == {PatchManager.applied()});")  # fmt: skip
    print(f"  the engine's client process (pid {after['pid']}) started its EngineCore and worker:")
    for pid, info in sorted(procs.items()):
        print(f"    pid {pid}: {info['name']} (parent {info['ppid']})")
    for pid in pids:
        who = procs.get(pid, {}).get("name", "an unknown process")
        print(f"  {sum(line['pid'] == pid for line in trace)} trace lines, one per scheduler step, "
              f"written by pid {pid} = {who}")  # fmt: skip
    first = next((line for line in trace if len(line["new"]) and line["step"] > 1), None)
    if first is not None:
        shown = {k: first[k] for k in ("pid", "step", "new", "tokens", "waiting")}
        print(f"  e.g. {json.dumps(shown)}")
    if args.keep:
        print(f"\nKept: {root} (trace.jsonl, each run's vllm.log)")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
