"""Refuse a venv whose site-packages holds a start-up hook that we did not expect.

    python3 -S -I tests/benchmarks/check_pth.py .venv

A `.pth` file in site-packages is read by every interpreter of that venv at start, and a line of
it that begins with `import` is run: that is how the malicious LiteLLM uploads (1.82.7, 1.82.8,
`litellm_init.pth`) ran code without being imported. `sitecustomize.py` and `usercustomize.py`
are run at start the same way. This script lists those files in each `lib/python*/site-packages`
of the venv given and exits 1, naming each file and its first line, when one of them is not
matched by a line of `pth_allowed.txt` beside it (a name or a glob; `#` starts a comment).

Run it with the BASE interpreter and `-S -I` (no site, isolated mode), never with the venv's own:
an interpreter of the venv would run the very hooks it is meant to catch before this file is read.
Standard library only, for the same reason.
"""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

ALLOWED = Path(__file__).resolve().parent / "pth_allowed.txt"
HOOKS = ("*.pth", "sitecustomize.py", "usercustomize.py")


def allowed_patterns(path: Path = ALLOWED) -> list[str]:
    patterns = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            patterns.append(line)
    return patterns


def site_packages(venv: Path) -> list[Path]:
    """Each distinct lib/python*/site-packages (and lib64) of the venv."""
    found: dict[Path, Path] = {}
    for lib in ("lib", "lib64"):
        for sp in sorted(venv.glob(f"{lib}/python*/site-packages")):
            if sp.is_dir():
                found.setdefault(sp.resolve(), sp)
    return list(found.values())


def first_line(path: Path, limit: int = 200) -> str:
    try:
        with path.open("rb") as f:
            raw = f.readline(limit + 1)
    except OSError as exc:
        return f"<unreadable: {exc}>"
    text = raw.decode("utf-8", "backslashreplace").rstrip("\r\n")
    return text[:limit] + ("..." if len(text) > limit else "")


def unexpected(venv: Path, patterns: list[str]) -> tuple[list[Path], list[Path]]:
    """(every start-up hook found, those no pattern allows)."""
    hooks: list[Path] = []
    for sp in site_packages(venv):
        for pattern in HOOKS:
            hooks += sorted(sp.glob(pattern))
    bad = [h for h in hooks if not any(fnmatch.fnmatchcase(h.name, p) for p in patterns)]
    return hooks, bad


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python3 -S -I {argv[0]} VENV", file=sys.stderr)
        return 2
    venv = Path(argv[1])
    if not site_packages(venv):
        print(f"check_pth: no lib/python*/site-packages under {venv}", file=sys.stderr)
        return 2
    hooks, bad = unexpected(venv, allowed_patterns())
    if bad:
        print(f"check_pth: {len(bad)} unexpected start-up file(s) in {venv}; each runs at every"
              " interpreter start. Not running the benchmarks.", file=sys.stderr)
        for path in bad:
            print(f"  {path}\n    first line: {first_line(path)}", file=sys.stderr)
        print(f"  If a file is known and wanted, add its name to {ALLOWED}.", file=sys.stderr)
        return 1
    print(f"check_pth: {venv}: {len(hooks)} start-up file(s), all allowed:"
          f" {', '.join(h.name for h in hooks) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
