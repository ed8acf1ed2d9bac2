"""Lines of Python files at a git revision: all lines (as wc -l) and code lines (not
blank, not only a comment, not inside a docstring), counted with Python's tokenizer.

    python scripts/count_code_lines.py eddc3cc^ moge/train.py moge/distributed_train.py ...

Prints one row per file and the total.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import tokenize


def code_lines(source: str) -> int:
    """Lines holding a token that is neither a comment nor a docstring (a string statement)."""
    lines: set[int] = set()
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = tok.type
        if kind in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            previous = kind if kind in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) else previous
            continue
        docstring = kind == tokenize.STRING and previous in (
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
        )
        if not docstring:
            lines.update(range(tok.start[0], tok.end[0] + 1))
        previous = kind
    return len(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="git revision (e.g. HEAD, eddc3cc^)")
    parser.add_argument("paths", nargs="+", help="files at that revision")
    args = parser.parse_args()
    total_all = total_code = 0
    for path in args.paths:
        source = subprocess.run(
            ["git", "show", f"{args.rev}:{path}"], check=True, capture_output=True, text=True
        ).stdout
        n_all, n_code = len(source.splitlines()), code_lines(source)
        total_all, total_code = total_all + n_all, total_code + n_code
        print(f"{n_all:6} {n_code:6}  {path}")
    print(f"{total_all:6} {total_code:6}  total (lines, code lines) at {args.rev}")


if __name__ == "__main__":
    main()
