"""Write fixmatch.py's shared plumbing into the other training scripts, so that a maintainer edits one copy.

Everything from the "Shared plumbing" banner to the end of a script is the same in all seven scripts (the
supervised baseline's copy lacks pseudo_label_stats, which scores pseudo-labels it does not have); the
algorithm above the banner is each script's own and is never touched. tests/test_skeleton.py holds the copies
identical; this tool makes them so:

    python tools/sync_plumbing.py           # edit fixmatch.py's plumbing, then copy it into the other six
    python tools/sync_plumbing.py --check   # exit 1 and name the scripts whose copy differs; writes nothing
"""

import argparse
import ast
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "fixmatch"
TARGETS = ["flexmatch", "freematch", "softmatch", "mixmatch", "remixmatch", "supervised"]
BANNER = "# ====================================================================================================\n" \
         "# Shared plumbing."
NOT_IN_SUPERVISED = "pseudo_label_stats"


def split_at_banner(text: str, name: str) -> tuple[str, str]:
    """(the script's own part, the plumbing from the banner on); the banner must be there exactly once."""
    if text.count(BANNER) != 1:
        raise SystemExit(f"error: {name}.py has {text.count(BANNER)} 'Shared plumbing' banners, expected 1")
    i = text.index(BANNER)
    return text[:i], text[i:]


def without_function(plumbing: str, function: str) -> str:
    """The plumbing with one top-level function (its decorators and the two blank lines after it) taken out."""
    node = next(n for n in ast.parse(plumbing).body if isinstance(n, ast.FunctionDef) and n.name == function)
    lines = plumbing.splitlines(keepends=True)
    start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    end = node.end_lineno
    while end < len(lines) and lines[end].strip() == "":  # the blank lines that separated it from the next
        end += 1
    return "".join(lines[:start] + lines[end:])


def synced(name: str, plumbing: str) -> tuple[str, str]:
    """(the script's text now, its text with the plumbing written in)."""
    with open(os.path.join(REPO, f"{name}.py")) as f:
        text = f.read()
    own, _ = split_at_banner(text, name)
    return text, own + (without_function(plumbing, NOT_IN_SUPERVISED) if name == "supervised" else plumbing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only say which copies differ (exit 1 if any); write nothing")
    args = p.parse_args(argv)
    with open(os.path.join(REPO, f"{SOURCE}.py")) as f:
        _, plumbing = split_at_banner(f.read(), SOURCE)
    differ = []
    for name in TARGETS:
        old, new = synced(name, plumbing)
        if old != new:
            differ.append(name)
            if not args.check:
                with open(os.path.join(REPO, f"{name}.py"), "w") as f:
                    f.write(new)
    if args.check:
        print(f"plumbing differs from {SOURCE}.py's in: {', '.join(differ)}" if differ else "all copies identical")
        return 1 if differ else 0
    print(f"wrote {SOURCE}.py's plumbing into: {', '.join(differ)}" if differ else "nothing to write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
