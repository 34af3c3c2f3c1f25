"""What `train.return_freed_memory` costs in speed (issue 15): the SmolLM2-135M-Instruct chatterbot LoRA SFT example,
the same steps with the flag off and on, each run its own process, alternating over rounds; prints each run's
training tokens/s and peak RSS, and the medians' ratio (on / off). Run alone on the machine.

    python benchmarks/return_freed_memory.py [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics

from _runs import RUNS, read_json, run_training

EXAMPLE = "examples/smollm2_chatterbot_lora.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for round_number in range(args.rounds):
        for setting in ("off", "on"):
            name = f"freed-{setting}-round{round_number}"
            shutil.rmtree(RUNS / name, ignore_errors=True)  # every invocation measures afresh
            run_training(EXAMPLE, name, [f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                                         "data.split.validation=0.01", "data.split.test=0.01",
                                         f"train.return_freed_memory={'true' if setting == 'on' else 'false'}"])
            summary, resources = read_json(RUNS / name / "summary.json"), read_json(RUNS / name / "resources.json")
            results[setting].append((summary["tokens_per_second"], resources.get("peak_rss_mib", float("nan"))))
            print(f"{name}: {summary['tokens_per_second']:.1f} tok/s, peak RSS {resources.get('peak_rss_mib')} MiB",
                  flush=True)
    medians = {setting: (statistics.median(t for t, _ in runs), statistics.median(m for _, m in runs))
               for setting, runs in results.items()}
    print(json.dumps({"runs": results, "medians": medians}))
    print(f"return_freed_memory on / off: speed {medians['on'][0] / medians['off'][0]:.3f}x, "
          f"peak RSS {medians['on'][1] / medians['off'][1]:.3f}x (medians of {args.rounds} alternating rounds)")


if __name__ == "__main__":
    main()
