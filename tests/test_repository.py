"""The repository speaks of itself only: no tracked file names a path on the machine it was written
on (a home or work folder) or a file outside the checkout."""
import subprocess
from pathlib import Path

import pytest

from conftest import repo_root

# Built from parts so that this file does not match itself.
MACHINE_PATHS = [b"/" + folder + b"/" for folder in (b"work", b"home", b"root", b"Users")]
OUTSIDE = [b"../" + b"shared"]


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root(), capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_names_a_machine_path_or_a_file_outside_the_repository():
    offenders = []
    for name in tracked_files():
        path = Path(repo_root()) / name
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        for pattern in MACHINE_PATHS + OUTSIDE:
            at = data.find(pattern)
            if at >= 0:
                line = data[:at].count(b"\n") + 1
                offenders.append(f"{name}:{line}: {pattern.decode()}")
    assert not offenders, "\n".join(offenders)
