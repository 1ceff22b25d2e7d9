"""Quantized bundles decode under the default settings a user gets.

On CPUs with Intel AMX, llama.cpp's extra buffer types make quantized decoding
segfault (docs/design.md §6); Engine's default ``extra_bufts="auto"`` turns them off
there. Each run happens in a child process so that a crash fails the test
instead of killing pytest. The greedy agreement of speculative decoding with
plain decoding on the same quantized main.gguf is measured and reported
(batched and single-row kernels may round differently on near-ties).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
from mtpcode.generation import Done, GenerationOptions
from mtpcode.runtime import Engine

prompts = ["def main():\n    ", "x = [i * 2 for i in range(10)]\n", "import os\nimport sys\n"]
result = {"runs": []}
with Engine(sys.argv[1], n_ctx=256, n_threads=1) as engine:   # default extra_bufts="auto"
    result["extra_bufts"] = engine.extra_bufts
    for prompt in prompts:
        outs = {}
        for heads in (0, 3):
            toks = []
            for ev in engine.generate(prompt, GenerationOptions(max_tokens=40, heads=heads)):
                if not isinstance(ev, Done):
                    toks += ev.token_ids
            outs[heads] = toks
        same = 0
        for a, b in zip(outs[0], outs[3]):
            if a != b:
                break
            same += 1
        result["runs"].append({"plain": len(outs[0]), "speculative": len(outs[3]), "agree_prefix": same})
print(json.dumps(result))
"""


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quantized_bundle_decodes_with_default_settings(make_bundle, quant, record_property) -> None:
    from mtpcode.llama import cpu_has_amx

    bundle = make_bundle(quant=quant)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{quant} decode died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["extra_bufts"] == (not cpu_has_amx())
    runs = result["runs"]
    assert all(r["plain"] > 0 and r["speculative"] > 0 for r in runs)
    agreed = sum(r["agree_prefix"] for r in runs)
    total = sum(min(r["plain"], r["speculative"]) for r in runs)
    rate = agreed / total
    record_property(f"{quant}_greedy_agreement", rate)
    print(f"{quant}: greedy agreement speculative vs plain {agreed}/{total} = {rate:.1%}")
    assert rate > 0.0


REPACK_CHILD = r"""
import json, sys
from mtpcode.generation import Done, GenerationOptions
from mtpcode.runtime import Engine

out = {}
for policy in sys.argv[2:]:
    with Engine(sys.argv[1], n_ctx=256, n_threads=1, extra_bufts=policy) as engine:
        toks = [t for ev in engine.generate("def main():\n    ", GenerationOptions(max_tokens=24, heads=3))
                if not isinstance(ev, Done) for t in ev.token_ids]
        out[policy] = {"tokens": toks, "repacked": engine.repacked}
print(json.dumps(out))
"""


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_K_M"])
def test_repack_policy_routes_q4_blocks_and_decodes(make_bundle, quant) -> None:
    """extra_bufts="repack": extra buffer types off, Q4_0/Q4_K block weights in CPU_REPACK."""
    from mtpcode.llama import cpu_has_amx, repack_pattern

    bundle = make_bundle(quant=quant)
    # dim 128 rows are too short for K-quants: the tiny Q4_K_M falls back to other types
    routed = bool(repack_pattern(bundle / "main.gguf"))
    assert routed or quant == "Q4_K_M"
    policies = ["repack"] + ([] if cpu_has_amx() else ["on"])  # "on" is the crash on AMX CPUs
    proc = subprocess.run([sys.executable, "-c", REPACK_CHILD, str(bundle), *policies],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"repack decode died (rc={proc.returncode}): {proc.stderr[-2000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["repack"]["repacked"] == routed and out["repack"]["tokens"]
    if "on" in out:  # same kernels as llama.cpp's own repacking
        assert out["repack"]["tokens"] == out["on"]["tokens"]
