"""The ``gradguard`` command line: ``gradguard demo``, ``gradguard report RUN_DIR`` and ``gradguard --version``.

Exit codes: 0 success; 2 bad arguments, unreadable input or an output directory that does not exist (nothing is
written); 3 an optional dependency is missing (the message names the ``pip install`` that adds it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gradguard import __version__

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_MISSING_DEPENDENCY = 3

__all__ = ["EXIT_MISSING_DEPENDENCY", "EXIT_OK", "EXIT_USAGE", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="gradguard keeps PyTorch training stable. Start with `gradguard demo`.",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}",
                        help="print the version of gradguard and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train models prone to exploding gradients with no protection, NormClip, an adaptive "
        "clipper and the Guard, side by side (CPU), and write logs and an HTML report",
        description="Train a vanilla RNN on the adding problem and a deep MLP at a high learning rate, each with no "
        "protection, gg.NormClip, an adaptive clipper (gg.AutoClip) and gg.Guard; every 40th batch is corrupt and "
        "one mlp batch has a NaN input. Prints a summary table with the Guard's diagnoses and the lines to add to "
        "your own loop, and writes JSONL, TensorBoard logs and report.html into --out (created if needed).",
    )
    demo.add_argument("--out", default="gradguard-demo", metavar="DIR",
                      help="output directory (default: ./gradguard-demo)")
    demo.add_argument("--quick", action="store_true", help="150 steps per run (well under a minute on 2 cores)")
    demo.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                      help="steps per run (default: 600, or 150 with --quick)")
    demo.add_argument("--seed", type=_int, default=0, metavar="S", help="random seed (default: 0)")
    demo.add_argument("--no-report", action="store_true", help="skip the HTML report")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser(
        "report", help="build a self-contained HTML report (with PNG plots) from a run recorded by gg.Monitor",
        description="Read RUN_DIR/metrics.jsonl (or RUN_DIR/*/metrics.jsonl for several runs) and write an HTML "
        "report with embedded plots; the same PNGs are written into OUT_files/ beside it.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the log_dir given to gg.Monitor")
    report.add_argument("-o", "--output", default=None, metavar="OUT.html",
                        help="report file, in an existing directory (default: RUN_DIR/report.html)")
    report.add_argument("--title", default=None, help="report title")
    return parser


def _error(command: str, message: str) -> None:
    print(f"gradguard {command}: error: {message}", file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from gradguard.report import ReportError, build_report

    if args.output is not None:  # never create directories the user did not ask for: a typo must not go unnoticed
        parent = Path(args.output).parent
        if not parent.is_dir():
            what = "is not a directory" if parent.exists() else "does not exist"
            _error("report", f"the directory of -o {args.output!r} ({str(parent)!r}) {what}; create it first "
                   f"(mkdir -p {parent}) or pass -o a file in an existing directory. Nothing was written.")
            return EXIT_USAGE
    try:
        result = build_report(args.run_dir, args.output, title=args.title)
    except ReportError as e:
        _error("report", str(e))
        return EXIT_USAGE
    except ImportError as e:
        _error("report", str(e))
        return EXIT_MISSING_DEPENDENCY
    for run in result.runs:
        for w in run.warnings:
            print(f"gradguard report: warning: {w}", file=sys.stderr)
    print(f"report: {result.html}")
    print(f"plots:  {len(result.images)} PNGs in {result.html.with_name(result.html.stem + '_files')}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from gradguard.demo import run_demo

    try:
        run_demo(args.out, quick=args.quick, steps=args.steps, seed=args.seed, report=not args.no_report,
                 progress=False if args.no_progress else None)
    except (ValueError, TypeError, FileExistsError) as e:
        _error("demo", str(e))
        return EXIT_USAGE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, 0 on --help
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    if args.command == "report":
        return _report(args)
    return _demo(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
