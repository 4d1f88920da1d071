"""The README's report figure: per-layer sensitivity of the digits CNN to integer bit widths.

Runs a post-training grid search of every layer's weight and activation of
``digits_cnn`` over int 2..8 (one fp32 baseline, then about fifty fast PTQ trials),
writes the full report into the run directory, and saves the sensitivity heatmap (layer
x bits per kind, the report's first "why" figure) to
``experiments/figures/digits_cnn_sensitivity.png``. About a minute on 2 CPU cores.

    python experiments/report_figure.py [--run-dir runs/report_figure] [--epochs 10]

Rerunning reuses the stored trials and baseline of the run directory.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bitwidth.criteria import make_criterion
from bitwidth.report import write_report
from bitwidth.report.build import figure_png
from bitwidth.report.plots import sensitivity_heatmap
from bitwidth.report.run_files import load_run
from bitwidth.report.tables import sensitivity_table
from bitwidth.runner import run_search
from bitwidth.trial import TrialOptions

FIGURE = Path(__file__).resolve().parent / "figures" / "digits_cnn_sensitivity.png"


def main(argv: list[str] | None = None) -> Path:
    """Run the search, write its report, save the figure; returns the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/report_figure", help="run directory (reused when rerun)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the fp32 baseline")
    parser.add_argument("--out", default=str(FIGURE), help="where to save the PNG")
    args = parser.parse_args(argv)

    criterion = make_criterion("accuracy", max_drop=0.01)
    result = run_search("digits_cnn", mode="ptq", kinds=("weight", "activation"), family="int",
                        candidates=(2, 3, 4, 5, 6, 8), strategy="grid", criterion=criterion,
                        trial_options=TrialOptions(epochs=args.epochs), run_dir=args.run_dir)
    report = write_report(args.run_dir)

    run = load_run(args.run_dir)
    base = run.summary["baseline"]["metric"]
    sens = sensitivity_table(result.trials, list(dict.fromkeys(result.min_bits["layer"])))
    fig = sensitivity_heatmap(sens, baseline=base, threshold=criterion.threshold({"accuracy": base}))
    fig.suptitle("digits_cnn, post-training int quantization: accuracy with one tensor quantized", fontsize=11)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(figure_png(fig))
    print(result.min_bits[["layer", "kind", "min_bits"]].to_string(index=False))
    print(f"figure: {out}\nreport: {report['html']}")
    return out


if __name__ == "__main__":
    main()
