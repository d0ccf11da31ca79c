"""KerasHub sweep: every KerasHub vision model of tests/kerashub_zoo.py, built
offline from its constructor (small config, random weights, H/W unknown),
gated, a random 30% of its channel groups removed, pruned and measured.

Writes benchmarks/results/kerashub_sweep.json and a markdown table
(benchmarks/results/kerashub_sweep.md): model, prunable MAC share, groups,
max relative error (surgery vs masking), FLOPs and params after ÷ before.

    PYTHONPATH=$PWD nice python benchmarks/kerashub_sweep.py [model ...]

Resumable: each model's row replaces its old one as soon as it is measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HERE = os.path.dirname(os.path.abspath(__file__))


def main(names) -> None:
    import keras
    import keras_hub

    from tests import kerashub_zoo as zoo
    from tests.test_kerashub import NOT_PRUNABLE

    names = names or list(zoo.MODELS)
    path = os.path.join(HERE, "results", "kerashub_sweep.json")
    done = {}
    if os.path.exists(path):  # resumable: rows of other models are kept
        with open(path) as f:
            done = {r["model"]: r for r in json.load(f)["rows"]}
    tmp = tempfile.mkdtemp()
    for name in names:
        start = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                row = zoo.sweep_one(name, tmpdir=tmp)
            except Exception as e:  # noqa: BLE001 - recorded in the table
                row = {"model": name, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
                       "trace": traceback.format_exc(limit=3)}
        row["note"] = NOT_PRUNABLE.get(name, "")
        row["seconds"] = round(time.time() - start, 1)
        row["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        row["load_average"] = os.getloadavg()[0]
        done[name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        rows = [done[n] for n in zoo.MODELS if n in done]
        meta = {
            "command": "PYTHONPATH=$PWD nice python benchmarks/kerashub_sweep.py [model ...]",
            "date": row["date"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
            "keras": keras.__version__, "keras_hub": keras_hub.__version__,
            "input_shape": list(zoo.SIZE), "removed_fraction": 0.3, "seed": 0,
        }
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(HERE, "results", "kerashub_sweep.md"), "w") as f:
            f.write(table(rows, meta))


def table(rows, meta) -> str:
    lines = [
        f"KerasHub {meta['keras_hub']}, Keras {meta['keras']}, input {tuple(meta['input_shape'])}, "
        f"random 30% of groups removed (seed 0); {meta['machine']}; rows measured "
        f"{min(r.get('date', '?') for r in rows)} to {max(r.get('date', '?') for r in rows)} (each row's date and "
        "load average are in kerashub_sweep.json).",
        "",
        "| model | class | prunable MAC share | groups (heads) | max rel. error | FLOPs after÷before | params after÷before "
        "| reloads | TaylorPruning steps (input) | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | | | | | | fails: {r['error']} {r['note']} |")
            continue
        if not r.get("pruned"):
            lines.append(f"| {r['model']} | {r['class']} | {r['prunable_mac_share']:.2f} | 0 | | | | | | {r['note'] or r.get('reason', '')} |")
            continue
        extra = r["note"]
        if r["unknown_layers"]:
            extra = (extra + "; " if extra else "") + "fixed units: " + ", ".join(r["unknown_layers"])
        if r.get("reload_error"):
            extra = (extra + "; " if extra else "") + "does not reload: " + r["reload_error"]
        heads = f" ({r['head_gates']} head gates)" if r.get("head_gates") else ""
        reloads = "no" if r.get("reload_error") else "yes"
        steps = ""
        if "taylor_steps" in r:
            shape = "×".join(str(d) for d in r["taylor_input_shapes"][0]) if r["taylor_input_shapes"] else "?"
            steps = f"{r['taylor_steps']} → FLOPs {r['taylor_flops']:.3f} ({'None×None' if r.get('dynamic_input') else 'fixed'} input, counted at {shape})"
        lines.append(
            f"| {r['model']} | {r['class']} | {r['prunable_mac_share']:.3f} | {r['groups']}{heads} | {r['max_rel_error']:.1e} | "
            f"{r['flops_ratio']:.3f} | {r['params_ratio']:.3f} | {reloads} | {steps} | {extra} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
