"""The README's commands, checked mechanically: every program a shell block runs is in the environment ``make``
builds (or is this repository's file), every ``distillery`` / ``jobs/*.py`` command parses with the real CLI,
every ``make`` target exists, every ``--config`` file a command reads is in the repository, and every
``--set key=value`` it shows (in a block or inline) is a real key with a valid value of that command's config."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BIN = os.path.dirname(sys.executable)
SHELL_BUILTINS = {"eval", "cd", "export", "source", "echo"}
# a block's language tag: shell blocks are untagged or sh/bash/shell/console; others (python, yaml, text) are not run
SHELL_TAGS = {"", "sh", "bash", "shell", "console"}


def shell_blocks() -> list[tuple[int, str]]:
    """(line number, text) of each shell code block of the README (continuation lines joined)."""
    blocks, cur, start, tag = [], None, 0, ""
    with open(README) as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if s.startswith("```"):
                if cur is None:
                    cur, start, tag = [], n, s[3:].strip().lower()
                else:
                    if tag in SHELL_TAGS:
                        blocks.append((start, "".join(cur).replace("\\\n", " ")))
                    cur = None
            elif cur is not None:
                cur.append(line)
    return blocks


def commands() -> list[tuple[int, list[str]]]:
    """(line of its block, argv) of every command in the README's shell blocks, comments stripped. An indented
    line that goes on with options (``[--x N]``, ``--y``) continues a synopsis's previous line."""
    out = []
    for start, text in shell_blocks():
        lines: list[str] = []
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            if lines and re.match(r"^\s+[\[(-]", line):
                lines[-1] += " " + line.strip()
            elif line.strip() and not line.strip().startswith("#"):
                lines.append(line.strip())
        out.extend((start, shlex.split(line)) for line in lines)
    return out


def is_synopsis(argv: list[str]) -> bool:
    """A usage line (``[--opt N]``, ``(--a | --b)``, ``...``) rather than a command to run as written."""
    return any(a.startswith(("[", "(")) or a in ("|", "...") for a in argv)


def program(argv: list[str]) -> list[str]:
    """argv without leading VAR=value assignments; ``eval "$(CMD)"`` gives CMD's argv."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    if argv[:1] == ["eval"] and len(argv) == 2:
        m = re.fullmatch(r"\$\((.*)\)", argv[1].strip())
        if m:
            return program(shlex.split(m.group(1)))
    return argv


def distillery_argv(argv: list[str]) -> list[str] | None:
    """The ``distillery`` arguments a command stands for (``jobs/X.py ARGS`` is ``distillery <its subcommand> ARGS``),
    or None when it is not one of ours."""
    argv = program(argv)
    if "--" in argv and argv[0] == "ray":  # ray job submit ... -- python jobs/X.py ARGS
        argv = argv[argv.index("--") + 1:]
    if argv and os.path.basename(argv[0]) == "distillery":
        return argv[1:]
    if len(argv) >= 2 and os.path.basename(argv[0]).startswith("python") and argv[1].startswith("jobs/"):
        with open(os.path.join(ROOT, argv[1])) as f:
            head = re.search(r"main\(\[(.*?)\*sys\.argv\[1:\]\]\)", f.read()).group(1)
        return [a.strip().strip("\"'") for a in head.split(",") if a.strip()] + argv[2:]
    return None


def config_class(args: list[str]):
    from app.config import RefineConfig
    from app.distill.config import DistillConfig, TuneDistillConfig
    from app.scaling.sweep import ScalingSweepConfig
    from app.serve.config import ServeConfig

    return {"refine": RefineConfig, "distill": DistillConfig, "tune-distill": TuneDistillConfig,
            "scaling": ScalingSweepConfig, "serve": ServeConfig}.get(args[0])


def _ids(items):
    return [f"line{start}:{' '.join(argv)[:60]}" for start, argv in items]


CMDS = commands()


def test_the_readme_has_commands_to_check():
    assert len(CMDS) >= 30 and any(program(a)[0] == "tensorboard" for _, a in CMDS)


@pytest.mark.parametrize("start,argv", CMDS, ids=_ids(CMDS))
def test_each_program_exists_where_make_puts_it(start, argv):
    argv = program(argv)
    exe = argv[0]
    if exe in SHELL_BUILTINS:
        return
    if "/" in exe:  # a file of the repository or of .venv/
        assert os.path.exists(os.path.join(ROOT, exe)) or os.path.exists(exe), f"README line {start}: {exe}"
        return
    if exe == "make":
        with open(os.path.join(ROOT, "Makefile")) as f:
            targets = set(re.findall(r"^([\w-]+):", f.read(), re.M))
        assert set(argv[1:]) <= targets, f"README line {start}: make {argv[1:]} (targets: {sorted(targets)})"
        return
    # the venv's programs (the environment make builds), then the machine's
    assert os.path.exists(os.path.join(BIN, exe)) or shutil.which(exe), f"README line {start}: {exe} is not installed"
    if exe.startswith("python") and len(argv) > 1 and not argv[1].startswith("-") and not is_synopsis(argv):
        assert os.path.isfile(os.path.join(ROOT, argv[1])), f"README line {start}: {argv[1]}"


OURS = [(s, a, d) for s, a in CMDS if (d := distillery_argv(a)) is not None]


def test_our_commands_are_found():
    assert {d[0] for _, _, d in OURS} >= {"refine", "distill", "tune-distill", "scaling", "serve", "delta", "dashboard"}


def _subparser(parser, args: list[str]):
    """The parser of the subcommand path ``args`` starts with, and the rest of ``args``."""
    while args and parser._subparsers is not None:
        (choices,) = [a.choices for a in parser._subparsers._group_actions]
        if args[0] not in choices:
            break
        parser, args = choices[args[0]], args[1:]
    return parser, args


@pytest.mark.parametrize("start,argv,args", OURS, ids=_ids([(s, a) for s, a, _ in OURS]))
def test_each_distillery_command_parses_and_its_config_and_sets_are_valid(start, argv, args):
    from app.cli import build_parser
    from app.config import ConfigError, load_config

    parser = build_parser()
    if is_synopsis(args):  # a usage line: its subcommand exists and takes every option it names
        sub, rest = _subparser(parser, args)
        assert sub is not parser, f"README line {start}: no subcommand {args[:2]}"
        known = {s for a in sub._actions for s in a.option_strings}
        named = {re.sub(r"[\[\]()|]", "", a).split("=")[0] for a in rest if re.sub(r"[\[(]", "", a).startswith("--")}
        assert named <= known, f"README line {start}: `distillery {' '.join(args[:2])}` has no {sorted(named - known)}"
        return
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse's error: the usage line is on stderr
        pytest.fail(f"README line {start}: `distillery {' '.join(args)}` does not parse (exit {e.code})")
    cls = config_class(args)
    config = getattr(ns, "config", None)
    if config and not config.startswith("out/"):  # out/...: written by an earlier command
        assert os.path.isfile(os.path.join(ROOT, config)), f"README line {start}: --config {config}"
    sets = getattr(ns, "overrides", None) or []
    assert cls is not None or not sets, f"README line {start}: --set on a command without a config"
    if cls is not None:
        try:
            load_config(cls, os.path.join(ROOT, config) if config and not config.startswith("out/") else None, sets)
        except ConfigError as e:
            pytest.fail(f"README line {start}: {e}")


def test_inline_sets_in_the_prose_are_real_keys():
    """``--set key=value`` written in the README's text (outside blocks), each checked against the configs of the
    section it is in (the job the section documents)."""
    from app.config import ConfigError, RefineConfig, load_config
    from app.distill.config import DistillConfig, TuneDistillConfig
    from app.scaling.sweep import ScalingSweepConfig
    from app.serve.config import ServeConfig

    with open(README) as f:
        text = f.read()
    sections = re.split(r"^## ", text, flags=re.M)
    owners = {"The refine job": RefineConfig, "Distillation": DistillConfig, "Tuning": TuneDistillConfig,
              "Scaling": ScalingSweepConfig, "Serving": ServeConfig}
    checked = 0
    for sec in sections:
        cls = next((c for title, c in owners.items() if sec.startswith(title)), None)
        for key, value in re.findall(r"`--set ([a-z][\w.]*)=([^`\s]+)`", sec):
            if key == "key":  # the syntax itself (`--set key=value`)
                continue
            assert cls is not None, f"--set {key}={value} in a section without a config: {sec[:40]!r}"
            try:
                load_config(cls, None, [f"{key}={value}"])
            except ConfigError as e:
                pytest.fail(f"README: `--set {key}={value}`: {e}")
            checked += 1
    assert checked >= 3


def test_tensorboard_reads_what_distillation_writes(tmp_path):
    """The README's ``tensorboard --logdir ...`` works: tensorboard is installed and reads tensorboardX's logs
    (``--inspect`` prints a log directory's summaries without serving anything)."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(tmp_path / "run")) as w:
        for step in range(3):
            w.add_scalar("train/loss", 1.0 / (step + 1), step)
    exe = os.path.join(BIN, "tensorboard")
    assert os.path.exists(exe), "tensorboard is not installed in the environment make builds"
    out = subprocess.run([exe, "--inspect", "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "train/loss" in out.stdout, out.stdout[-2000:]
