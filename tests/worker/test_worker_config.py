"""hep-exec configuration: precedence flags > env > file, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from publish.keys import load_or_create_keys
from worker.config import (
    ConfigError,
    ExecConfig,
    parse_exec_args,
    parse_size,
    total_ram_bytes,
)
from worker.repo.keys import load_master_keys

GiB = 1024**3


def parse(argv: list[str], env: dict[str, str] | None = None) -> ExecConfig:
    """Parsed as on a machine without a CernVM-FS configuration (unless the test gives one)."""
    return parse_exec_args(
        argv, {"HEP_EXEC_CVMFS_CONFIG": "none", **(env or {})}, total_ram=8 * GiB
    )


def error(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(argv, env)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_minimal() -> None:
    cfg = parse(["--server", "http://a:3128|http://b:3128;http://c:3128", "--", "ls", "-la"])
    assert cfg.command == ("ls", "-la")
    assert [list(g) for g in cfg.servers] == [
        ["http://a:3128/cvmfs/@fqrn@", "http://b:3128/cvmfs/@fqrn@"],
        ["http://c:3128/cvmfs/@fqrn@"],
    ]
    assert str(cfg.proxies) == "DIRECT" and cfg.warnings == ()
    assert cfg.ram_bytes == 2 * GiB and cfg.keys == () and not cfg.verify_signatures
    assert cfg.log_level == "warning" and cfg.repositories == () and cfg.mount == "/cvmfs"


def test_command_options_are_not_ours() -> None:
    cfg = parse(["--server", "http://p:1", "--", "python3", "--ram", "x", "--", "y"])
    assert cfg.command == ("python3", "--ram", "x", "--", "y")
    cfg = parse(["--server", "http://p:1", "ls", "-la"])  # without '--' too
    assert cfg.command == ("ls", "-la")
    assert cfg.servers == (("http://p:1/cvmfs/@fqrn@",),)


def test_precedence_flags_env_file(tmp_path: Path) -> None:
    conf = tmp_path / "hep-exec.yaml"
    conf.write_text(
        "server: http://file:1\nram: 1G\nlog-level: debug\nrepositories: [a.org, b.org]\n"
        "timeout: 7\nretries: 4\ntrap: ptrace\nram-files: memfd\n"
    )
    env = {"HEP_EXEC_RAM": "512M", "HEP_EXEC_SERVER": "http://env:2", "HEP_EXEC_RETRIES": "2"}
    cfg = parse(["--config", str(conf), "--server", "http://flag:3", "--", "true"], env)
    assert cfg.servers == (("http://flag:3/cvmfs/@fqrn@",),)  # flag beats env and file
    assert cfg.ram_bytes == 512 * 1024**2  # env beats file
    assert cfg.retries == 2
    assert cfg.log_level == "debug" and cfg.timeout == 7.0  # file beats defaults
    assert cfg.trap == "ptrace"
    assert parse(["--trap", "notify", "--config", str(conf), "--", "true"], env).trap == "notify"
    assert cfg.ram_files == "memfd"
    assert (
        parse(["--config", str(conf), "--", "true"], {"HEP_EXEC_RAM_FILES": "TMPFS"}).ram_files
        == "tmpfs"
    )
    assert parse(["--ram-files", "auto", "--config", str(conf), "--", "true"]).ram_files == "auto"
    assert cfg.in_process  # on unless turned off
    assert not parse(
        ["--no-in-process", "--", "true"], {"HEP_EXEC_SERVER": "http://e:2"}
    ).in_process
    assert not parse(["--config", str(conf), "--", "true"], {"HEP_EXEC_IN_PROCESS": "0"}).in_process
    off = tmp_path / "off.yaml"
    off.write_text("server: http://file:1\nin_process: false\n")
    assert not parse(["--config", str(off), "--", "true"]).in_process
    assert not cfg.io_uring  # off unless allowed
    env = {"HEP_EXEC_SERVER": "http://e:2"}
    assert parse(["--allow-io-uring", "--", "true"], env).io_uring
    assert parse(["--", "true"], {**env, "HEP_EXEC_IO_URING": "1"}).io_uring
    (tmp_path / "uring.yaml").write_text("server: http://file:1\nio_uring: true\n")
    assert parse(["--config", str(tmp_path / "uring.yaml"), "--", "true"]).io_uring
    assert cfg.repositories == ("a.org", "b.org")
    assert cfg.sources["servers"] == "--server" and cfg.sources["ram_bytes"] == "HEP_EXEC_RAM"
    assert cfg.config_file == conf
    # the config file can come from the environment too
    cfg = parse(["--", "true"], {"HEP_EXEC_CONFIG": str(conf)})
    assert cfg.servers == (("http://file:1/cvmfs/@fqrn@",),) and cfg.ram_bytes == GiB


def test_proxy_list_in_yaml(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("server:\n  - http://a:1|http://b:1\n  - http://c:1\n")
    cfg = parse(["--config", str(conf), "--", "true"])
    assert len(cfg.servers) == 2


def test_check_needs_no_command() -> None:
    cfg = parse(["--check", "--stats", "--server", "http://p:1"])
    assert cfg.check and cfg.stats and cfg.command == ()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2G", 2 * GiB),
        ("512M", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("1.5GiB", int(1.5 * GiB)),
        ("100k", 102400),
        ("1048576", 1048576),
        ("4096B", 4096),
        ("25%", 2 * GiB),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text, 8 * GiB) == value


def test_total_ram_from_meminfo() -> None:
    assert total_ram_bytes("MemTotal:       16318404 kB\nMemFree: 1 kB\n") == 16318404 * 1024
    assert total_ram_bytes("nothing") is None


S = ["--server", "http://p:1"]


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--", "ls"], {}, "no server configured"),
        (S, {}, "no command given"),
        ([*S, "--ram", "lots", "--", "ls"], {}, "--ram: 'lots': not a size"),
        ([*S, "--ram", "10k", "--", "ls"], {}, "at least 1M"),
        ([*S, "--", "ls"], {"HEP_EXEC_RAM": "2X"}, "HEP_EXEC_RAM: '2X'"),
        (["--server", "ftp://p:1", "--", "ls"], {}, "--server"),
        (["--server", "DIRECT", "--", "ls"], {}, "not an http(s):// or file:// URL"),
        ([*S, "--log-level", "loud", "--", "ls"], {}, "not a log level"),
        ([*S, "--", "ls"], {"HEP_EXEC_TRAP": "fuse"}, "HEP_EXEC_TRAP: 'fuse'"),
        ([*S, "--ram-files", "hugetlb", "--", "ls"], {}, "--ram-files: 'hugetlb'"),
        ([*S, "--timeout", "soon", "--", "ls"], {}, "--timeout: 'soon'"),
        ([*S, "--timeout", "0", "--", "ls"], {}, "timeout must be positive"),
        ([*S, "--retries", "-1", "--", "ls"], {}, "--retries"),
        ([*S, "--repositories", "a/b", "--", "ls"], {}, "not a repository name"),
        ([*S, "--frobnicate", "--", "ls"], {}, "unrecognized arguments"),
        ([*S, "--config", "/nonexistent.yaml", "--", "ls"], {}, "/nonexistent"),
        ([*S, "--ram", "150%", "--", "ls"], {}, "percentage"),
    ],
)
def test_one_line_errors(argv: list[str], env: dict[str, str], needle: str) -> None:
    assert needle in error(argv, env)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    msg = error(["--config", str(bad), "--", "ls"])
    assert str(bad) in msg and "YAML" in msg
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("server: http://p:1\ncolour: blue\n")
    msg = error(["--config", str(unknown), "--", "ls"])
    assert str(unknown) in msg and "colour" in msg
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert "expected a mapping" in error(["--config", str(scalar), "--", "ls"])
    value = tmp_path / "value.yaml"
    value.write_text("server: http://p:1\nram: huge\n")
    msg = error(["--config", str(value), "--", "ls"])
    assert msg.startswith(f"{value}: ram: 'huge'")


def test_master_keys(tmp_path: Path) -> None:
    import datetime as dt

    keys_dir = tmp_path / "keys"
    load_or_create_keys(keys_dir, "k.example.org", dt.datetime.now(dt.UTC))
    cfg = parse(["--server", "http://p:1", "--keys", str(keys_dir), "--", "true"])
    assert cfg.verify_signatures
    assert len(load_master_keys(cfg.keys)) == 1
    assert len(load_master_keys([keys_dir / "k.example.org.pub"])) == 1
    with pytest.raises(ConfigError, match="no such key"):
        load_master_keys([tmp_path / "missing.pub"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.pub"):
        load_master_keys([empty])
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    with pytest.raises(ConfigError, match=r"junk\.pub"):
        load_master_keys([junk])


def test_node_cache_options_defaults_and_sources(tmp_path: Path) -> None:
    """README: the shared cache is on unless ``--no-shared-cache``/``HEP_EXEC_SHARED_CACHE=0``;
    its directory comes from ``--cache-dir``/``HEP_EXEC_CACHE_DIR`` (default: derived at run
    time), it exits ``--cache-idle`` (60) seconds after its last client; prefetch runs
    ``--prefetch-concurrency`` (16) fetches at once; ``--timeout``, ``--connect-timeout``,
    ``--retries``, ``--proxy-reset-after`` default to 5 s, 2 s, 1, 300 s."""
    cfg = parse(["--server", "http://p:1", "--", "true"])
    assert cfg.shared_cache and cfg.cache_dir is None and cfg.cache_idle == 60.0
    assert cfg.prefetch_concurrency == 16 and cfg.record_path is None
    assert cfg.prefetch_path is None and not cfg.cache_daemon
    assert (cfg.timeout, cfg.connect_timeout, cfg.retries) == (5.0, 2.0, 1)
    assert cfg.proxy_reset_after == 300.0
    assert not parse(["--server", "http://p:1", "--no-shared-cache", "--", "true"]).shared_cache
    env = {"HEP_EXEC_SHARED_CACHE": "0", "HEP_EXEC_CACHE_DIR": str(tmp_path / "env")}
    env |= {"HEP_EXEC_CACHE_IDLE": "5", "HEP_EXEC_PREFETCH_CONCURRENCY": "4"}
    cfg = parse(["--server", "http://p:1", "--", "true"], env)
    assert not cfg.shared_cache and cfg.cache_dir == tmp_path / "env"
    assert cfg.cache_idle == 5.0 and cfg.prefetch_concurrency == 4
    conf = tmp_path / "c.yaml"
    conf.write_text(
        f"server: http://p:1\nshared_cache: false\ncache_dir: {tmp_path / 'file'}\ncache_idle: 7\n"
        f"record: {tmp_path / 'rec.list'}\nprefetch_concurrency: 8\n"
    )
    cfg = parse(["--config", str(conf), "--cache-dir", str(tmp_path / "flag"), "--", "true"], env)
    assert cfg.cache_dir == tmp_path / "flag"  # flag beats env and file
    assert cfg.cache_idle == 5.0 and cfg.prefetch_concurrency == 4  # env beats file
    assert not cfg.shared_cache and cfg.record_path == tmp_path / "rec.list"  # file
    assert parse(["--cache-daemon", "--server", "http://p:1"]).cache_daemon  # needs no command


def test_dir_readahead_from_flag_env_and_file_and_its_bounds(tmp_path: Path) -> None:
    """``--dir-readahead N`` (64; 0: off) from the flag, HEP_EXEC_DIR_READAHEAD or the file's
    ``dir_readahead``; a value out of range is one line naming the option."""
    base = ["--server", "http://p:1"]
    assert parse([*base, "--", "true"]).dir_readahead == 64
    assert parse([*base, "--dir-readahead", "0", "--", "true"]).dir_readahead == 0
    assert parse([*base, "--", "true"], {"HEP_EXEC_DIR_READAHEAD": "8"}).dir_readahead == 8
    conf = tmp_path / "c.yaml"
    conf.write_text("server: http://p:1\ndir_readahead: 16\n")
    assert parse(["--config", str(conf), "--", "true"]).dir_readahead == 16
    for bad in ("-1", "5000", "many"):
        with pytest.raises(ConfigError, match="--dir-readahead") as e:
            parse([*base, "--dir-readahead", bad, "--", "true"])
        assert "\n" not in str(e.value)


def test_servers_and_forward_proxies_as_cvmfs_names_them() -> None:
    cfg = parse(
        [
            "--server", "http://s1/cvmfs/@fqrn@;http://s2:8000",
            "--proxy", "http://sq1:3128|sq2:3128;DIRECT",
            "--", "true",
        ]
    )  # fmt: skip
    assert cfg.servers == (("http://s1/cvmfs/@fqrn@",), ("http://s2:8000/cvmfs/@fqrn@",))
    assert str(cfg.proxies) == "http://sq1:3128|http://sq2:3128;DIRECT"
    assert cfg.warnings == () and cfg.sources["proxies"] == "--proxy"


def test_old_proxy_form_is_read_as_servers_with_one_line() -> None:
    """hep-exec's --proxy used to name hep-proxy itself: still taken, with what to write."""
    cfg = parse(["--proxy", "http://hp:8080|http://hp2:8080", "--", "true"])
    assert cfg.servers == (("http://hp:8080/cvmfs/@fqrn@", "http://hp2:8080/cvmfs/@fqrn@"),)
    assert str(cfg.proxies) == "DIRECT"
    (line,) = cfg.warnings
    assert "--server 'http://hp:8080/cvmfs/@fqrn@|http://hp2:8080/cvmfs/@fqrn@'" in line
    # the form preload specs and every CVMFS configuration use
    cfg = parse(["--proxy", "http://hp:8080/cvmfs/@fqrn@", "--", "true"])
    assert cfg.servers == (("http://hp:8080/cvmfs/@fqrn@",),) and len(cfg.warnings) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--proxy", "not a url"], "--proxy: 'not a url' is not a list of URLs"),
        (["--server", "not a url"], "--server: server 'not a url'"),
        (["--server", "http://s:port"], "--server: server 'http://s:port'"),
        (["--server", "http://s", "--proxy", "http://sq:x"], "--proxy: proxy 'http://sq:x'"),
        (["--server", "http://s", "--proxy", "http://s/cvmfs/@fqrn@"], "is a server, not a"),
        (["--server", "http://s/cvmfs/cms.cern.ch"], "write http://s/cvmfs/@fqrn@"),
        (["--proxy", "DIRECT"], "DIRECT needs a server"),
        (["--server", "http://s", "--cvmfs-config", "/nonexistent"], "/nonexistent: no such"),
    ],
)
def test_bad_servers_and_proxies_stop_at_start(argv: list[str], needle: str) -> None:
    assert needle in error([*argv, "--", "true"])


def _site(tmp_path: Path) -> Path:
    """A site's /etc/cvmfs: proxies for all, servers and keys per domain, one repository
    with its own server."""
    etc = tmp_path / "cvmfs"
    keys = etc / "keys" / "example.org"
    for d in (etc / "domain.d", etc / "config.d", keys):
        d.mkdir(parents=True)
    (keys / "example.org.pub").write_text("not parsed until a mount\n")
    (etc / "default.local").write_text(
        'CVMFS_HTTP_PROXY="http://squid:3128;DIRECT"\nCVMFS_TIMEOUT=9\nCVMFS_MAX_RETRIES=3\n'
        "CVMFS_DEFAULT_DOMAIN=example.org\nCVMFS_REPOSITORIES=a.example.org,b\n"
    )
    (etc / "domain.d" / "example.org.conf").write_text(
        f'CVMFS_SERVER_URL="http://s1/cvmfs/@fqrn@;http://s2/cvmfs/@fqrn@"\nCVMFS_KEYS_DIR={keys}\n'
    )
    (etc / "config.d" / "b.example.org.local").write_text(
        "CVMFS_SERVER_URL=http://only-b/cvmfs/b.example.org\n"
    )
    return etc


def test_site_configuration_fills_what_hep_exec_was_not_told(tmp_path: Path) -> None:
    from worker.sites import describe_sources, keys_for, routes_for

    etc = _site(tmp_path)
    cfg = parse(["--", "true"], {"HEP_EXEC_CVMFS_CONFIG": str(etc)})
    assert cfg.servers == ()  # given per domain
    assert str(cfg.proxies) == "http://squid:3128;DIRECT"
    assert cfg.sources["proxies"] == f"{etc}/default.local:1"
    assert cfg.timeout == 9.0 and cfg.retries == 3  # CVMFS_TIMEOUT: through a proxy
    assert cfg.repositories == ("a.example.org", "b.example.org")
    a = routes_for(cfg, "a.example.org")
    assert a.servers == (("http://s1",), ("http://s2",)) and a.whole_path
    assert str(a.proxies) == "http://squid:3128;DIRECT"
    b = routes_for(cfg, "b.example.org")
    assert b.servers == (("http://only-b/cvmfs/b.example.org",),) and not b.whole_path
    assert keys_for(cfg, "a.example.org") == (etc / "keys/example.org/example.org.pub",)
    shown = {option: (value, where) for option, value, where in describe_sources(cfg)}
    assert shown["proxy"] == ("http://squid:3128;DIRECT", f"{etc}/default.local:1")
    assert shown["cvmfs-config"] == (str(etc), "HEP_EXEC_CVMFS_CONFIG")
    # flags and HEP_EXEC_* win over every file of the site
    cfg = parse(
        ["--server", "http://mine:1", "--proxy", "DIRECT", "--timeout", "2", "--", "true"],
        {"HEP_EXEC_CVMFS_CONFIG": str(etc)},
    )
    b = routes_for(cfg, "b.example.org")
    assert b.servers == (("http://mine:1",),) and str(b.proxies) == "DIRECT"
    assert cfg.timeout == 2.0 and cfg.retries == 3


def test_site_configuration_errors_name_file_and_line(tmp_path: Path) -> None:
    etc = _site(tmp_path)
    (etc / "default.local").write_text("# site\nCVMFS_TIMEOUT=soon\nCVMFS_HTTP_PROXY=DIRECT\n")
    msg = error(["--", "true"], {"HEP_EXEC_CVMFS_CONFIG": str(etc)})
    assert f"{etc}/default.local:2" in msg and "CVMFS_TIMEOUT" in msg
    (etc / "default.local").write_text("CVMFS_HTTP_PROXY=$(discover-proxy)\n")
    cfg = parse(["--", "true"], {"HEP_EXEC_CVMFS_CONFIG": str(etc)})
    (line,) = cfg.warnings
    assert f"{etc}/default.local:1" in line and str(cfg.proxies) == "DIRECT"
