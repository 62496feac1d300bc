"""`pip install glow_ext` needs torch and numpy only; the extras bring the rest.

The declared dependencies are read from pyproject.toml. The bare environment is a plain venv (no
system site-packages) whose site-packages holds symlinks to torch, numpy and the distributions they
require, resolved from the installed metadata, and to this checkout's glow_ext: nothing is
downloaded, and scikit-learn, pillow and matplotlib are not there. In it the library, every module of
the package and the benchmark commands' imports must work, and the training commands must say in
one line which extra they need.
"""
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from glow_ext.__main__ import REQUIRED_MODULES

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Import names of the extras' packages (and scipy, which scikit-learn brings): none may be in the
# bare environment, or the test would prove nothing.
OPTIONAL_MODULES = ("sklearn", "PIL", "matplotlib", "scipy", "pytest_benchmark", "normflows", "nflows")
TRAINING_COMMANDS = (["train", "--steps", "1"], ["sample", "--checkpoint", "missing.pt"],
                     ["evaluate", "--checkpoint", "missing.pt"], ["ablate"])


def names(requirements):
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def extra_requirements(extra):
    """The distributions an extra installs, its references to other extras of glow_ext expanded."""
    found = set()
    for text in EXTRAS[extra]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == canonicalize_name(PROJECT["name"]):
            for inner in requirement.extras:
                found |= extra_requirements(inner)
        else:
            found.add(canonicalize_name(requirement.name))
    return found


def test_the_core_dependencies_are_torch_and_numpy():
    assert names(PROJECT["dependencies"]) == {"torch", "numpy"}


def test_every_module_a_command_requires_comes_with_its_extra():
    distributions = importlib.metadata.packages_distributions()
    for extra, modules in REQUIRED_MODULES.items():
        for module in modules:
            if module not in distributions:
                pytest.skip(f"{module} is not installed here, so its distribution is unknown")
            assert names(distributions[module]) & extra_requirements(extra), (extra, module)


def test_all_installs_every_extra():
    others = set().union(*(extra_requirements(e) for e in EXTRAS if e != "all"))
    assert extra_requirements("all") == others


def installed_closure(roots):
    """{name: Distribution} of the installed distributions roots require, transitively, with the
    environment markers of this interpreter (a requirement's extras included)."""
    environment = default_environment()
    found, todo = {}, [(root, frozenset()) for root in roots]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not needed on this platform, or its import is optional
        if key in found and extras <= found[key][1]:
            continue
        extras = extras | (found[key][1] if key in found else frozenset())
        found[key] = (distribution, extras)
        for text in distribution.requires or ():
            requirement = Requirement(text)
            if requirement.marker is None or any(
                    requirement.marker.evaluate({**environment, "extra": extra})
                    for extra in ("", *extras)):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return {key: distribution for key, (distribution, _) in found.items()}


def top_level_entries(distribution):
    """The files and folders a distribution installs directly in site-packages (its dist-info
    folder included), as paths on this machine."""
    entries = set()
    for file in distribution.files or ():
        first = file.parts[0]
        if first not in ("..", "__pycache__"):
            entries.add(Path(distribution.locate_file(first)))
    return entries


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bare")
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder / "venv")],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    python = folder / "venv" / "bin" / "python"
    site_packages = Path(subprocess.run(
        [python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    closure = installed_closure(names(PROJECT["dependencies"]))
    assert {"torch", "numpy"} <= set(closure)
    assert not set(closure) & set().union(*(extra_requirements(e) for e in EXTRAS)) - {"torch", "numpy"}
    for distribution in closure.values():
        for entry in top_level_entries(distribution):
            link = site_packages / entry.name
            if entry.exists() and not link.exists():  # namespace folders (nvidia/) are shared
                link.symlink_to(entry)
    (site_packages / "glow_ext").symlink_to(ROOT / "glow_ext")
    return python


def run_bare(python, args, cwd):
    """python -I (no PYTHONPATH, no user site-packages, not the checkout on sys.path)."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd)}
    return subprocess.run([str(python), "-I", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


BARE_CHECKS = textwrap.dedent("""
    import contextlib, importlib, importlib.util, io, pkgutil, sys, warnings
    for module in {optional!r}:
        assert importlib.util.find_spec(module) is None, f"{{module}} is importable"
    warnings.simplefilter("ignore", RuntimeWarning)  # kernels that do not fit fall back, with a warning
    import torch
    import glow_ext
    from glow_ext import compat, models, nn, ops, reference
    from glow_ext.compat import glow_pytorch, rosinality
    import os
    assert os.path.realpath(glow_ext.__file__).startswith({package!r}), glow_ext.__file__

    # Every module of the package imports: optional packages are imported where they are used.
    for module in pkgutil.walk_packages(glow_ext.__path__, "glow_ext."):
        importlib.import_module(module.name)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    layer = nn.ActNormInvConv2d(4).double()
    params = [p.detach().clone() for p in layer._params()]
    for param in (params[0], params[1], params[5]):
        param.normal_()
    y, logdet = ops.actnorm_invconv_lu(x, *params)
    y_ref, logdet_ref = reference.actnorm_invconv_lu(x, *params)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, logdet_ref)
    torch.testing.assert_close(ops.actnorm_invconv_lu_inverse(y, *params), x)

    y, logdet = layer(x)
    torch.testing.assert_close(layer.reverse(y), x)
    y, logdet = rosinality.InvConv2dLU(4).double()(x)
    conv = glow_pytorch.InvertibleConv1x1(4, LU_decomposed=True).double()
    z, _ = conv(x, logdet=0, reverse=False)
    torch.testing.assert_close(conv(z, logdet=0, reverse=True)[0], x)
    glow = models.Glow(in_channels=1, image_size=4, K=1, L=1, hidden_channels=8)
    bpd = glow.bits_per_dim(torch.rand(3, 1, 4, 4) - 0.5, n_bins=17)
    assert torch.isfinite(bpd).all(), bpd

    # The training commands that cannot run say which extra to install.
    from glow_ext.__main__ import main
    for argv in {commands!r}:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            status = main(argv)
        assert status == 2, (argv, status)
        assert stderr.getvalue().count("\\n") == 1 and "[train]" in stderr.getvalue(), stderr.getvalue()
    print("BARE_OK")
""")


def test_the_library_works_with_torch_and_numpy_only(bare_python, tmp_path):
    script = BARE_CHECKS.format(optional=OPTIONAL_MODULES, package=str(ROOT / "glow_ext"),
                                commands=TRAINING_COMMANDS[1:])
    result = run_bare(bare_python, ["-c", script], tmp_path)
    assert result.returncode == 0 and "BARE_OK" in result.stdout, result.stdout + result.stderr


def test_glow_ext_train_without_the_train_extra_fails_in_one_line(bare_python, tmp_path):
    result = run_bare(bare_python, ["-m", "glow_ext", *TRAINING_COMMANDS[0]], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "[train]" in line and re.search(r"pip install .*glow_ext\[train\]", line), line
    assert result.stdout == ""
