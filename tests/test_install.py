"""scripts/install.py: uv gets pip's whole configuration, or pip installs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("install", ROOT / "scripts" / "install.py")
install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install)


def test_pip_settings_are_read_as_pip_reads_them(tmp_path, monkeypatch):
    # A file's [install] section overrides its [global] one, and PIP_* variables both.
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///g\nfind-links = /g\n"
                    "[install]\nextra-index-url = file:///a file:///b\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/env")
    monkeypatch.setenv("PIP_CONSTRAINT", "/c.txt")
    settings = install.pip_settings()
    assert settings["extra-index-url"] == "file:///a file:///b"
    assert settings["find-links"] == "/env"
    assert settings["constraint"] == "/c.txt"


def test_uv_gets_every_setting_or_none(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    options, env = install.uv_options({
        "extra-index-url": "file:///a file:///b", "find-links": "/w", "constraint": "/c.txt",
        "cert": "/ca.pem", "disable-pip-version-check": "1"})
    assert options == ["--index-strategy", "unsafe-best-match",
                       "--extra-index-url", "file:///a", "--extra-index-url", "file:///b",
                       "--find-links", "/w", "--constraint", "/c.txt"]
    assert env["SSL_CERT_FILE"] == "/ca.pem"
    # A setting uv has no counterpart for (a proxy), or none readable: pip installs.
    assert install.uv_options({"proxy": "http://proxy:3128"}) is None
    assert install.uv_options(None) is None
