"""vitkernels/_env.py is the one place the library reads environment variables, and it lists every
flag the library, setup.py, the tests and the bench scripts use."""

import os
import pathlib
import re

import pytest

from vitkernels import _env

ROOT = pathlib.Path(__file__).resolve().parents[2]
_READ = re.compile(r"os\.environ\.get\(|os\.getenv\(|os\.environ\[")
_NAME = re.compile(r"\b((?:VITKERNELS|VKEMU|VK)_[A-Z_]+|TRITON_INTERPRET)\b")


def test_library_reads_its_flags_only_through_env():
    offenders = []
    for path in (ROOT / "vitkernels").rglob("*.py"):
        if path.name == "_env.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _READ.search(line) and _NAME.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "read these through vitkernels._env:\n" + "\n".join(offenders)


# A read of a flag: os.environ / getenv / _env in Python, $NAME or ${NAME} in shell.
_FLAG_READ = re.compile(
    r"(?:environ\.get\(|environ\[|getenv\(|_env\.(?:get|enabled)\()\s*[\'\"]"
    r"((?:VITKERNELS|VKEMU|VK)_[A-Z_]+|TRITON_INTERPRET)[\'\"]"
    r"|\$\{?((?:VITKERNELS|VKEMU|VK)_[A-Z_]+)"
)


def test_every_flag_read_anywhere_is_listed():
    files = [ROOT / "setup.py", ROOT / ".ci" / "run", *(ROOT / "scripts").glob("*.sh")]
    for folder in ("vitkernels", "tests", "bench"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".cpp", ".h")]
    used = {}
    for path in files:
        if path.resolve() == pathlib.Path(__file__).resolve():
            continue
        for match in _FLAG_READ.finditer(path.read_text()):
            used.setdefault(match.group(1) or match.group(2), str(path.relative_to(ROOT)))
    missing = {name: where for name, where in used.items() if name not in _env.FLAGS}
    assert not missing, f"environment flags missing from vitkernels/_env.py: {missing}"
    for name in _env.FLAGS:
        assert name in _env.__doc__, f"{name} is not documented in vitkernels/_env.py"


def test_get_and_enabled(monkeypatch):
    monkeypatch.delenv("VITKERNELS_BACKEND", raising=False)
    assert _env.get("VITKERNELS_BACKEND") == "auto"
    monkeypatch.setenv("VITKERNELS_BACKEND", " triton ")
    assert _env.get("VITKERNELS_BACKEND") == "triton"
    for value, on in (("1", True), ("true", True), ("0", False), ("", False), ("no", False)):
        monkeypatch.setenv("VITKERNELS_NO_JIT", value)
        assert _env.enabled("VITKERNELS_NO_JIT") is on
    assert "VITKERNELS_BACKEND" in _env.set_flags()
    with pytest.raises(KeyError, match="not a vitkernels environment flag"):
        _env.get("VITKERNELS_TYPO")
    assert os.environ.get("VITKERNELS_TYPO") is None


def test_reads_follow_every_way_of_setting_the_environment(monkeypatch):
    """Flags are read from os.environ's encoded store (the fast path): writes through os.environ,
    monkeypatch, deletion and non-ASCII values all show at once."""
    monkeypatch.setenv("VITKERNELS_CSRC", "/tmp/ü")
    assert _env.get("VITKERNELS_CSRC") == "/tmp/ü"
    os.environ["VITKERNELS_CSRC"] = "/elsewhere"
    assert _env.get("VITKERNELS_CSRC") == "/elsewhere"
    del os.environ["VITKERNELS_CSRC"]
    assert _env.get("VITKERNELS_CSRC") == ""
    monkeypatch.setattr(_env.os, "environ", {"VITKERNELS_CSRC": "/plain"})  # a mapping without _data
    assert _env.get("VITKERNELS_CSRC") == "/plain"
