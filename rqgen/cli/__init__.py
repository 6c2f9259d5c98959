"""The `rqgen` command (also `python -m rqgen`). Each subcommand is a thin shell over a
library function, so everything here can also be done from Python; one module per command
group (train, sample, evaluate, convert), sharing the arguments in `common`."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from rqgen import __version__, card
from rqgen.cli import convert, data, eval_gen, eval_ref, evaluate, sample, train
from rqgen.errors import Interrupted, RqgenError


class _Help(argparse.HelpFormatter):
    """--help shows each option's default, unless its help already explains it."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default  # `is`, not `in`: 0 == False would hide a default of 0
        quiet = d is None or d is False or d == argparse.SUPPRESS or not action.option_strings
        return text if quiet or "default" in text else f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (subcommands inherit the class),
    and defaults in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rqgen", description="Residual-quantized autoregressive image generation."
    )

    parser.add_argument("--version", action="version", version=f"rqgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        data.add_prepare,
        train.add_train_vae,
        evaluate.add_eval_vae,
        evaluate.add_reconstruct,
        train.add_train_ar,
        train.add_refit_codebook,
        train.add_plan,
        sample.add_sample,
        sample.add_serve,
        sample.add_demo,
        convert.add_convert_official,
        convert.add_push,
        eval_gen.add_eval_gen,
        eval_ref.add_fid_stats,
    ):
        add(sub)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments, with key=value overrides accepted anywhere on the line: argparse alone
    stops collecting them at the first option that follows them."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra and (overrides != extra or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def _close_progress_bars() -> None:
    """A bar left open by the failure would share its line with the error message."""

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _out_of_memory(e: BaseException) -> int:
    _close_progress_bars()
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    print(
        f"rqgen: error: out of memory ({first[:160]}): lower train.batch_size (or raise "
        "train.grad_accum) for training, --batch-size for sampling and evaluation; the last "
        "checkpoint is intact",
        file=sys.stderr,
    )
    return 2


def one_line(error: Exception) -> str:
    """An error's message; for one raised in a DataLoader worker (which torch re-raises with
    the worker's traceback in its message), the original message alone."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(type(error).__module__) else last


def main(argv: list[str] | None = None) -> int:
    card.running_command(sys.argv[1:] if argv is None else argv)  # what model cards quote
    args = parse(argv)
    start = time.time()
    try:
        return args.func(args)
    except Interrupted as e:
        _close_progress_bars()
        print(f"rqgen: {e}", file=sys.stderr)
        return e.exit_code
    except RqgenError as e:
        _close_progress_bars()
        print(f"rqgen: error: {one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError as e:  # host memory; torch.OutOfMemoryError (a RuntimeError) below
        return _out_of_memory(e)
    except RuntimeError as e:
        if type(e).__name__ != "OutOfMemoryError":
            raise
        return _out_of_memory(e)
    except KeyboardInterrupt:
        print(f"rqgen: interrupted after {time.time() - start:.0f}s", file=sys.stderr)
        return 130
