"""Does distilling across tokenizers help? Trains the byte-level-BPE teacher of
``configs/xtok_teacher.yaml`` (unless ``--teacher`` names a finished run), then, for each seed, a
unigram-tokenizer student from scratch and distilled with ULD, with the shared-vocabulary KL (the
projected vocabulary map, and the exact one) and with the hybrid (``configs/xtok_kd.yaml``), all
with the same architecture, data, order and budget. The students have a quarter of the training
text (``--train-fraction`` changes it), the teacher all of it. Students are compared by held-out
per-byte perplexity (comparable across tokenizers) with paired seeds: a variant beats scratch when
its mean per-byte perplexity is lower and it wins on most seeds.

    python examples/cross_tokenizer_experiment.py --output runs/xtok --seeds 1 2 3

Writes ``summary.json`` in the output directory and prints a table (with each run's wall time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import kdcore

HERE = Path(__file__).resolve().parent / "configs"
VARIANTS = {
    "scratch": ["method={name: supervised}", "teachers=[]"],
    "uld": ["method.loss=uld"],
    "shared_vocab": ["method.loss=shared_vocab", "method.vocabulary=projected"],
    "shared_vocab_exact": ["method.loss=shared_vocab", "method.vocabulary=exact"],
    "hybrid": ["method.loss=hybrid", "method.vocabulary=projected"],
}


def run(config: Path, output: Path, overrides: list[str]) -> tuple[dict, float]:
    if (output / "student.pt").exists():  # finished earlier: read its final evaluation
        events = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [e for e in events if e["event"] == "eval"][-1], float("nan")
    start = time.perf_counter()
    metrics = kdcore.Distiller(config, overrides=[*overrides, f"output_dir={output}"]).fit()
    return metrics, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/xtok"))
    parser.add_argument("--teacher", type=Path, default=None, help="a finished xtok_teacher.yaml run to reuse")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-chars", type=int, default=None, help="use only the beginning of the text (a quick try)")
    parser.add_argument("--train-fraction", type=float, default=None,
                        help="of the training text, for the students (default: the config's, 0.25)")
    args = parser.parse_args()
    teacher_dir = args.teacher or args.output / "teacher"
    shortened = [f"training.epochs={args.epochs}"] if args.epochs else []
    if args.max_chars:
        shortened += [f"data.options.max_chars={args.max_chars}", "scheduler.warmup_steps=0"]
    teacher_metrics, teacher_time = run(HERE / "xtok_teacher.yaml", teacher_dir, shortened)
    results: dict[str, dict[int, dict]] = {name: {} for name in VARIANTS}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        for name, overrides in VARIANTS.items():
            teacher = [] if name == "scratch" else [f"teachers.0.checkpoint={teacher_dir / 'student.pt'}"]
            fraction = [] if args.train_fraction is None else [f"data.options.train_fraction={args.train_fraction}"]
            metrics, seconds = run(HERE / "xtok_kd.yaml", args.output / f"{name}-seed{seed}",
                                   [*overrides, *shortened, *fraction, f"seed={seed}", *teacher])
            results[name][seed] = {key: metrics[key] for key in ("byte_perplexity", "perplexity", "token_accuracy")}
            times[name].append(seconds)
    summary = {"teacher": {"byte_perplexity": teacher_metrics["byte_perplexity"], "seconds": teacher_time},
               "seeds": args.seeds, "train_fraction": args.train_fraction or 0.25, "variants": {}}
    scratch = results["scratch"]
    for name, by_seed in results.items():
        values = [by_seed[s]["byte_perplexity"] for s in args.seeds]
        entry = {"byte_perplexity": values, "mean_byte_perplexity": statistics.mean(values),
                 "seconds": times[name]}
        if name != "scratch":
            gains = [scratch[s]["byte_perplexity"] - by_seed[s]["byte_perplexity"] for s in args.seeds]
            wins = sum(g > 0 for g in gains)
            entry.update(mean_gain=statistics.mean(gains), wins=wins,
                         beat_scratch=statistics.mean(gains) > 0 and wins > len(gains) / 2)
        summary["variants"][name] = entry
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"teacher (byte-level BPE 1024, 4 layers x 128): per-byte perplexity "
          f"{summary['teacher']['byte_perplexity']:.4f}")
    print(f"{'student (unigram 512, 1 layer x 64)':<38}{'per-byte ppl (mean)':>20}{'gain':>9}{'wins':>7}  verdict")
    for name, entry in summary["variants"].items():
        verdict = "-" if name == "scratch" else ("beats scratch" if entry["beat_scratch"] else "does not beat scratch")
        gain = f"{entry['mean_gain']:+.4f}" if "mean_gain" in entry else ""
        wins = f"{entry['wins']}/{len(args.seeds)}" if "wins" in entry else ""
        seconds = ", ".join(f"{t:.0f}" for t in entry["seconds"] if t == t)
        print(f"{name:<38}{entry['mean_byte_perplexity']:>20.4f}{gain:>9}{wins:>7}  {verdict}"
              + (f"  ({seconds} s)" if seconds else ""))


if __name__ == "__main__":
    main()
