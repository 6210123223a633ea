"""The CernVM-FS client configuration reader, on real files laid out as in /etc/cvmfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvmfs_format.client_config import (
    KNOWN_KEYS,
    ClientConfig,
    Setting,
    config_float,
    config_int,
    config_keys,
    config_paths,
    config_repositories,
    load_client_config,
    parse_config_text,
)
from cvmfs_format.errors import FormatError


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def parse(text: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    made, warnings = parse_config_text(text, "f.conf", {}, env)
    return {k: s.value for k, s in made.items()}, warnings


def cfg_of(**values: str) -> ClientConfig:
    settings = {
        k: Setting(v, f"/etc/cvmfs/default.local:{n}") for n, (k, v) in enumerate(values.items(), 1)
    }
    return ClientConfig(settings, ("/etc/cvmfs/default.local",), ())


def test_config_paths_order_and_domain() -> None:
    assert config_paths(None) == ["default.conf", "default.d/*.conf", "default.local"]
    assert config_paths("cms.cern.ch")[3:] == [
        "domain.d/cern.ch.conf",
        "domain.d/cern.ch.local",
        "config.d/cms.cern.ch.conf",
        "config.d/cms.cern.ch.local",
    ]
    assert config_paths("sft.cern.ch")[3] == "domain.d/cern.ch.conf"
    assert config_paths("alice.example.org.uk")[3] == "domain.d/example.org.uk.conf"
    assert config_paths("local")[3:] == ["config.d/local.conf", "config.d/local.local"]
    with pytest.raises(FormatError, match="not a repository name"):
        config_paths("../etc")


def test_precedence_across_all_files(tmp_path: Path) -> None:
    layers = [
        "default.conf",
        "default.d/10-site.conf",
        "default.d/50-later.conf",
        "default.local",
        "domain.d/cern.ch.conf",
        "domain.d/cern.ch.local",
        "config.d/cms.cern.ch.conf",
        "config.d/cms.cern.ch.local",
    ]
    # Each layer sets its own key and LAST; later ones must win.
    for n, rel in enumerate(layers):
        write(tmp_path, rel, f"KEY{n}={n}\nLAST={rel}\n")
    write(tmp_path, "default.d/ignored.txt", "LAST=wrong\n")
    write(tmp_path, "domain.d/example.org.conf", "LAST=other-domain\n")
    write(tmp_path, "config.d/atlas.cern.ch.conf", "LAST=other-repo\n")
    cfg = load_client_config(tmp_path, "cms.cern.ch")
    assert cfg.files == tuple(str(tmp_path / rel) for rel in layers)
    assert cfg.get("LAST") == "config.d/cms.cern.ch.local"
    assert cfg.source("LAST") == f"{tmp_path}/config.d/cms.cern.ch.local:2"
    assert all(cfg.get(f"KEY{n}") == str(n) for n in range(len(layers)))
    assert cfg.warnings == ()

    # Without a repository only the default level is read; default.d sorts by name.
    (tmp_path / "default.local").unlink()
    cfg = load_client_config(tmp_path, None)
    assert cfg.get("LAST") == "default.d/50-later.conf"
    assert len(cfg.files) == 3
    assert cfg.get("nothing") is None and cfg.source("nothing") is None


def test_domain_is_fqrn_without_first_label(tmp_path: Path) -> None:
    write(tmp_path, "domain.d/cern.ch.conf", "CVMFS_SERVER_URL=http://s1/cvmfs/@fqrn@\n")
    write(tmp_path, "domain.d/opensciencegrid.org.local", "CVMFS_SERVER_URL=http://osg\n")
    assert load_client_config(tmp_path, "sft.cern.ch").get("CVMFS_SERVER_URL") == (
        "http://s1/cvmfs/@fqrn@"
    )
    assert load_client_config(tmp_path, "oasis.opensciencegrid.org").get("CVMFS_SERVER_URL") == (
        "http://osg"
    )
    assert load_client_config(tmp_path, "x.desy.de").get("CVMFS_SERVER_URL") is None


def test_variables_refer_to_earlier_files_and_environ(tmp_path: Path) -> None:
    write(tmp_path, "default.conf", "BASE=/cvmfs-keys\nCVMFS_MAX_RETRIES=1\n")
    write(tmp_path, "default.local", "CVMFS_KEYS_DIR=$BASE/cern.ch\nBASE=/changed\n")
    write(
        tmp_path,
        "config.d/cms.cern.ch.local",
        'CVMFS_HTTP_PROXY="${SITE_PROXY};DIRECT"\n'
        "CVMFS_PUBLIC_KEY=${BASE}/a.pub:$HOME/b.pub\n"
        "CVMFS_MAX_RETRIES=$((CVMFS_MAX_RETRIES+1))\n",
    )
    cfg = load_client_config(
        tmp_path,
        "cms.cern.ch",
        {"SITE_PROXY": "http://squid:3128", "HOME": "/home/u", "BASE": "env"},
    )
    assert cfg.get("CVMFS_KEYS_DIR") == "/cvmfs-keys/cern.ch"
    assert cfg.get("CVMFS_HTTP_PROXY") == "http://squid:3128;DIRECT"
    assert cfg.get("CVMFS_PUBLIC_KEY") == "/changed/a.pub:/home/u/b.pub"
    # The arithmetic line is skipped, so the earlier value stands.
    assert cfg.get("CVMFS_MAX_RETRIES") == "1"
    assert cfg.source("CVMFS_MAX_RETRIES") == f"{tmp_path}/default.conf:2"
    assert cfg.warnings == (
        f"{tmp_path}/config.d/cms.cern.ch.local:3: cannot read this line (arithmetic); ignored",
    )
    # Unset everywhere: empty, as in the shell.
    assert load_client_config(tmp_path, "cms.cern.ch").get("CVMFS_HTTP_PROXY") == ";DIRECT"


def test_known_settings_come_before_environ() -> None:
    known = {"A": Setting("from-file", "x:1")}
    made, _ = parse_config_text("B=$A C=1\nB=$A\nD=${E}", "f", known, {"A": "env", "E": "e"})
    assert {k: s.value for k, s in made.items()} == {"B": "from-file", "D": "e"}
    assert made["B"].source == "f:2"


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("A=plain", "plain"),
        ("export A=exported", "exported"),
        ("  A=indented   # trailing comment", "indented"),
        ("A=x#not-a-comment", "x#not-a-comment"),
        ("A='single $B \\n \" #'", 'single $B \\n " #'),
        ('A="double $B ${B}"', "double bee bee"),
        ('A="esc \\" \\\\ \\$B \\x"', 'esc " \\ $B \\x'),
        ("A=foo\"$B\"'x'bar", "foobeexbar"),
        ("A=un\\ quoted\\$", "un quoted$"),
        ("A=", ""),
        ("A=''", ""),
        ("A=1;", "1"),
        ("A=1 ; # done", "1"),
        ("A=cost$", "cost$"),
        ("A=${UNSET:-fallback}", "fallback"),
        ("A=${B:-fallback}", "bee"),
        ("A=${EMPTY:-fallback}", "fallback"),
        ("A=${UNSET:=also}", "also"),
        ('A="${UNSET:-two words}/x"', "two words/x"),
        ("A=${UNSET:-$B/x}", "bee/x"),
        ("A=${UNSET:-}", ""),
        ('A="http://a:3128|http://b:3128;DIRECT"', "http://a:3128|http://b:3128;DIRECT"),
    ],
)
def test_value_syntax(line: str, value: str) -> None:
    assert parse(f"B=bee\nEMPTY=\n{line}\n") == ({"B": "bee", "EMPTY": "", "A": value}, [])


def test_blank_comment_and_bare_export_lines_are_silent() -> None:
    assert parse("\n   \n# comment\n   # indented\nexport CVMFS_X\r\nA=1\r\n") == ({"A": "1"}, [])


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("A=$(hostname)", "command substitution"),
        ('A="$(hostname)"', "command substitution"),
        ("A=`hostname`", "command substitution"),
        ('A="x`id`"', "command substitution"),
        ("$(setup)", "command substitution"),
        ("A=$((1+2))", "arithmetic"),
        ("A=1; B=2", "';'-chained commands"),
        ("A=1 B=2", "text after the value"),
        ("A=1 cmd", "text after the value"),
        ("A='open", "unbalanced quotes"),
        ('A="open', "unbalanced quotes"),
        ("A=${B:-x", "unclosed '${'"),
        ("A=${#B}", "unsupported expansion '${...}'"),
        ("A=${B/x/y}", "unsupported expansion '${B/x...}'"),
        ("A=$1", "special parameter '$1'"),
        ("A=$'x\\n'", "quoting $'...'"),
        ('A=$"x"', 'quoting $"..."'),
        ("A=x|y", "shell operator '|'"),
        ("A=x && B=y", "shell operator '&'"),
        ("A=x > /dev/null", "shell operator '>'"),
        ("A=continued \\", "text after the value"),
        ("A=continued\\", "line continuation"),
        ("A =1", "not a KEY=VALUE assignment"),
        ("1A=1", "not a KEY=VALUE assignment"),
        ("A+=1", "not a KEY=VALUE assignment"),
        ("echo hello", "not a KEY=VALUE assignment"),
        ("[ -f /x ] && A=1", "not a KEY=VALUE assignment"),
        (". /etc/cvmfs/site.conf", "reads another file"),
        ("source /etc/cvmfs/site.conf", "reads another file"),
        ("fi", "shell 'fi' statement"),
        ("if [ -f /x ]; then A=1; fi", "shell 'if' statement"),
    ],
)
def test_unreadable_line_warns_once_and_sets_nothing(line: str, why: str) -> None:
    values, warnings = parse(f"B=bee\n{line}\nC=after\n")
    assert values == {"B": "bee", "C": "after"}
    assert warnings == [f"f.conf:2: cannot read this line ({why}); ignored"]


def test_compound_commands_warn_on_every_line() -> None:
    text = """\
A=before
case "$X" in
  cms) A=cms ;;
esac
setup() {
  A=function
}
for r in a b; do
  A=$r
done
function g {
  A=g
}
A=after
"""
    values, warnings = parse(text)
    assert values == {"A": "after"}
    assert [w.split(": cannot")[0] for w in warnings] == [f"f.conf:{n}" for n in range(2, 14)]
    assert "(shell 'case' statement)" in warnings[0]
    assert "(part of a shell 'case' block)" in warnings[1]
    assert "(function definition)" in warnings[3]
    assert "(part of a shell 'for' block)" in warnings[8]
    assert "(function definition)" in warnings[9]
    assert "(part of a shell 'function' block)" in warnings[10]


def test_realistic_cvmfs_config_default_fragment(tmp_path: Path) -> None:
    write(
        tmp_path,
        "domain.d/cern.ch.conf",
        """\
# This file is part of the cvmfs-config-default package.
# Do not edit; put local settings into cern.ch.local

CVMFS_SERVER_URL="http://cvmfs-stratum-one.cern.ch/cvmfs/@fqrn@;http://cernvmfs.gridpp.rl.ac.uk/cvmfs/@fqrn@"
CVMFS_KEYS_DIR=/etc/cvmfs/keys/cern.ch
CVMFS_USE_GEOAPI=yes

if [ "x$CVMFS_HTTP_PROXY" = "x" ]; then
  CVMFS_HTTP_PROXY=DIRECT
fi
""",
    )
    write(tmp_path, "default.local", "CVMFS_HTTP_PROXY='http://ca-proxy.cern.ch:3128;DIRECT'\n")
    cfg = load_client_config(tmp_path, "cms.cern.ch")
    name = f"{tmp_path}/domain.d/cern.ch.conf"
    assert cfg.get("CVMFS_SERVER_URL") == (
        "http://cvmfs-stratum-one.cern.ch/cvmfs/@fqrn@;http://cernvmfs.gridpp.rl.ac.uk/cvmfs/@fqrn@"
    )
    assert cfg.source("CVMFS_SERVER_URL") == f"{name}:4"
    assert cfg.get("CVMFS_KEYS_DIR") == "/etc/cvmfs/keys/cern.ch"
    assert cfg.get("CVMFS_USE_GEOAPI") == "yes"
    assert cfg.get("CVMFS_HTTP_PROXY") == "http://ca-proxy.cern.ch:3128;DIRECT"
    assert cfg.source("CVMFS_HTTP_PROXY") == f"{tmp_path}/default.local:1"
    assert cfg.warnings == (
        f"{name}:8: cannot read this line (shell 'if' statement); ignored",
        f"{name}:9: cannot read this line (part of a shell 'if' block); ignored",
        f"{name}:10: cannot read this line (part of a shell 'if' block); ignored",
    )
    assert set(KNOWN_KEYS) >= {"CVMFS_SERVER_URL", "CVMFS_KEYS_DIR", "CVMFS_HTTP_PROXY"}


def test_missing_root_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="configuration directory does not exist") as err:
        load_client_config(tmp_path / "absent", None)
    assert str(err.value) == f"{tmp_path}/absent: CernVM-FS configuration directory does not exist"
    write(tmp_path, "file", "")
    with pytest.raises(FormatError, match="does not exist"):
        load_client_config(tmp_path / "file", None)
    write(tmp_path, "default.conf", "A=1\n")
    (tmp_path / "default.local").mkdir()
    with pytest.raises(FormatError) as err:
        load_client_config(tmp_path, None)
    assert str(err.value).startswith(f"{tmp_path}/default.local: cannot read (")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(tmp_path: Path) -> None:
    path = write(tmp_path, "default.local", "A=1\n")
    path.chmod(0)
    with pytest.raises(FormatError) as err:
        load_client_config(tmp_path, None)
    assert str(err.value) == f"{path}: cannot read (Permission denied)"


def test_undecodable_bytes_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "default.conf").write_bytes(b"A=caf\xe9\nB=ok\n")
    cfg = load_client_config(tmp_path, None)
    assert cfg.get("A") == "caf\ufffd" and cfg.get("B") == "ok"


def test_numbers() -> None:
    cfg = cfg_of(CVMFS_TIMEOUT="5", CVMFS_TIMEOUT_DIRECT=" 2.5 ", CVMFS_MAX_RETRIES="0", E="")
    assert config_float(cfg, "CVMFS_TIMEOUT") == 5.0
    assert config_float(cfg, "CVMFS_TIMEOUT_DIRECT") == 2.5
    assert config_int(cfg, "CVMFS_MAX_RETRIES") == 0
    assert config_float(cfg, "UNSET") is None and config_int(cfg, "UNSET") is None
    assert config_float(cfg, "E") is None and config_int(cfg, "E") is None


@pytest.mark.parametrize("bad", ["abc", "0", "-1", "nan", "inf", "1e999", "5s"])
def test_bad_seconds_name_file_and_line(bad: str) -> None:
    with pytest.raises(FormatError) as err:
        config_float(cfg_of(X="1", CVMFS_TIMEOUT=bad), "CVMFS_TIMEOUT")
    assert str(err.value) == (
        f"/etc/cvmfs/default.local:2: CVMFS_TIMEOUT={bad}: not a number of seconds"
    )


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "+2", "٣"])
def test_bad_retries_name_file_and_line(bad: str) -> None:
    with pytest.raises(FormatError) as err:
        config_int(cfg_of(CVMFS_MAX_RETRIES=bad), "CVMFS_MAX_RETRIES")
    assert str(err.value) == (
        f"/etc/cvmfs/default.local:1: CVMFS_MAX_RETRIES={bad}: not a whole number (0 or more)"
    )


def test_keys_from_public_key_or_keys_dir(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("cern.ch.pub", "cern-it1.cern.ch.pub", "README", "old.pub.bak"):
        write(keys, name, "")
    (keys / "dir.pub").mkdir()
    assert config_keys(cfg_of()) is None
    assert config_keys(cfg_of(CVMFS_KEYS_DIR=str(keys))) == [
        keys / "cern-it1.cern.ch.pub",
        keys / "cern.ch.pub",
    ]
    both = cfg_of(CVMFS_KEYS_DIR=str(keys), CVMFS_PUBLIC_KEY=f"{keys}/cern.ch.pub:{keys}/README:")
    assert config_keys(both) == [keys / "cern.ch.pub", keys / "README"]

    with pytest.raises(FormatError) as err:
        config_keys(cfg_of(CVMFS_PUBLIC_KEY=f"{keys}/cern.ch.pub:{keys}/gone.pub"))
    assert str(err.value) == (
        f"/etc/cvmfs/default.local:1: CVMFS_PUBLIC_KEY: {keys}/gone.pub: no such file"
    )
    with pytest.raises(
        FormatError, match=r"default.local:1: CVMFS_PUBLIC_KEY: .*/dir.pub: no such"
    ):
        config_keys(cfg_of(CVMFS_PUBLIC_KEY=f"{keys}/dir.pub"))
    with pytest.raises(FormatError) as err:
        config_keys(cfg_of(X="1", CVMFS_KEYS_DIR=str(tmp_path / "nokeys")))
    assert str(err.value) == (
        f"/etc/cvmfs/default.local:2: CVMFS_KEYS_DIR={tmp_path}/nokeys: no such directory"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FormatError, match=r"default.local:1: CVMFS_KEYS_DIR=.*/empty: no \*.pub key in it"
    ):
        config_keys(cfg_of(CVMFS_KEYS_DIR=str(tmp_path / "empty")))


def test_keys_through_loader(tmp_path: Path) -> None:
    write(tmp_path, "keys/cern.ch/cern.ch.pub", "")
    write(tmp_path, "default.conf", f"CVMFS_KEYS_DIR={tmp_path}/keys/cern.ch\n")
    cfg = load_client_config(tmp_path, None)
    assert config_keys(cfg) == [tmp_path / "keys/cern.ch/cern.ch.pub"]


def test_repositories() -> None:
    assert config_repositories(cfg_of()) is None
    assert config_repositories(cfg_of(CVMFS_REPOSITORIES="atlas.cern.ch, ,cms.cern.ch,")) == [
        "atlas.cern.ch",
        "cms.cern.ch",
    ]
    cfg = cfg_of(
        CVMFS_DEFAULT_DOMAIN="cern.ch", CVMFS_REPOSITORIES="atlas,sft.cern.ch,atlas.cern.ch"
    )
    assert config_repositories(cfg) == ["atlas.cern.ch", "sft.cern.ch"]
    assert config_repositories(cfg_of(CVMFS_REPOSITORIES="atlas")) == ["atlas"]
    with pytest.raises(FormatError) as err:
        config_repositories(cfg_of(CVMFS_REPOSITORIES="atlas.cern.ch,../x"))
    assert str(err.value) == (
        "/etc/cvmfs/default.local:1: CVMFS_REPOSITORIES: '../x' is not a repository name"
    )
