"""A small real English corpus that needs no hub: Debian's fortunes.

The Debian packages ``fortunes-min`` and ``fortunes`` (fortune-mod's
data files: about 15,000 quotations, jokes, definitions and short
stories, 2.5 MB, in Debian main under the BSD license of fortune-mod)
install from Debian's package archive like any other package. This
command uses them from ``/usr/share/games/fortunes`` when installed,
else fetches the two ``.deb`` files with ``apt-get download`` (no root
needed when the package lists are current) and unpacks them under the
output directory. It writes the corpus in both TinyStories forms:

    <output>/fortunes-train.txt, fortunes-valid.txt
        documents separated by ``<|endoftext|>`` lines
    <output>/parquet/train-00000-of-00001.parquet, validation-...
        one document per row of a ``text`` column

Every 20th document goes to validation. ``COPYRIGHT`` is the packages'
license text.

    python -m data_prep.english_corpus --output data/english
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from data_prep import prepare
from data_prep.documents import SEPARATOR

PACKAGES = ("fortunes-min", "fortunes")
INSTALLED = Path("/usr/share/games/fortunes")
UNPACKED = "debian/usr/share/games/fortunes"
NOT_PROSE = {"ascii-art"}
VALIDATION_EVERY = 20
OUTPUTS = ("fortunes-train.txt", "fortunes-valid.txt", "parquet/train-00000-of-00001.parquet",
           "parquet/validation-00000-of-00001.parquet")


def build(output: Path, fortunes_dir: Path | None = None) -> list[Path]:
    """Write the corpus under ``output`` unless it is there already."""
    output = Path(output)
    paths = [output / name for name in OUTPUTS]
    if all(path.is_file() for path in paths):
        return paths
    source = Path(fortunes_dir) if fortunes_dir else _fortunes_dir(output)
    docs = read_fortunes(source)
    if not docs:
        raise RuntimeError(f"fortunes: no fortune files in {source}")
    train = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY != VALIDATION_EVERY - 1]
    valid = [d for i, d in enumerate(docs) if i % VALIDATION_EVERY == VALIDATION_EVERY - 1]
    write_text(paths[0], train)
    write_text(paths[1], valid)
    write_parquet(paths[2], train)
    write_parquet(paths[3], valid)
    copyright = _copyright(source)
    if copyright:
        _atomic(output / "COPYRIGHT", lambda tmp: shutil.copyfile(copyright, tmp))
    return paths


def read_fortunes(directory: Path) -> list[str]:
    """Each fortune of each fortune file (those with a ``.dat``
    index), in file-name order; a line holding only ``%`` ends one."""
    docs = []
    for dat in sorted(Path(directory).glob("*.dat")):
        path = dat.with_suffix("")
        if path.name in NOT_PROSE or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in re.split(r"^%[ \t]*$", text, flags=re.M) if d.strip()]
    return docs


def write_text(path: Path, docs: list[str]) -> None:
    """TinyStories' text form: each document, then a separator line."""
    _atomic(path, lambda tmp: tmp.write_text("".join(f"{d}\n{SEPARATOR}\n" for d in docs),
                                             encoding="utf-8"))


def write_parquet(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _atomic(path, lambda tmp: pq.write_table(pa.table({"text": docs}), tmp))


def _atomic(path: Path, write) -> None:
    """Write through a temporary name so no half file looks done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _fortunes_dir(output: Path) -> Path:
    if (INSTALLED / "cookie").is_file():
        return INSTALLED
    unpacked = output / UNPACKED
    if not (unpacked / "cookie").is_file():
        debs = output / "debian"
        debs.mkdir(parents=True, exist_ok=True)
        for package in PACKAGES:
            _apt_download(package, debs)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(debs)], check=True)
    return unpacked


def _apt_download(package: str, directory: Path) -> None:
    def download():
        return subprocess.run(["apt-get", "download", package], cwd=directory,
                              capture_output=True, text=True)

    done = download()
    if done.returncode and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        done = download()
    if done.returncode:
        raise RuntimeError(
            f"fortunes: `apt-get download {package}` failed ({done.stderr.strip()}); "
            f"install it (apt-get install {' '.join(PACKAGES)}) or pass --fortunes-dir")


def _copyright(source: Path) -> Path | None:
    """The packages' copyright file: ``usr/share/doc`` beside
    ``usr/share/games/fortunes``."""
    found = source.resolve().parent.parent / "doc" / "fortunes" / "copyright"
    return found if found.is_file() else None


def main(argv=None) -> int:
    p = prepare.command_line(__doc__, "english_corpus")
    p.add_argument("--output", default="data/english",
                   help="corpus directory (default data/english)")
    p.add_argument("--fortunes-dir", help="fortune files to use instead of Debian's")
    args = p.parse_args(argv)
    try:
        paths = build(Path(args.output), args.fortunes_dir)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("corpus: " + " ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
