"""`lmgate deploy compose`: the files it writes, their modes, what a rerun keeps, and how it
refuses bad input, without Docker (tests/shipping/test_team_compose.py brings the project up)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tray_app.cli.deploy import Deployment, nginx_site
from tray_app.cli.main import main
from tray_app.config.settings import Config

DOMAIN = "llm.example.com"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["deploy", "compose", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    directory = tmp_path / "team"
    code, out, err = _run(capsys, "--domain", DOMAIN, "--output", str(directory))
    assert (code, err) == (0, ""), err
    return directory, out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _secrets(directory: Path) -> list[str]:
    """Every secret value the command made."""
    shared = _env(directory / "secrets" / "lmgate.env")
    database = shared["LMGATE_SECRET_STATE_DATABASE_URL"]
    cache = shared["LMGATE_SECRET_STATE_REDIS_URL"]
    return [
        database.split("//lmgate:", 1)[1].split("@", 1)[0],
        cache.split("//:", 1)[1].split("@", 1)[0],
        shared["LMGATE_SECRET_JWT_SIGNING_KEY"],
    ]


def _compose(directory: Path) -> dict[str, Any]:
    loaded = yaml.safe_load((directory / "compose.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_the_secrets_are_fresh_private_and_agree_with_each_other(
    project: tuple[Path, str],
) -> None:
    directory, printed = project
    secrets_dir = directory / "secrets"
    assert _mode(secrets_dir) == 0o700
    assert _mode(secrets_dir / "lmgate.env") == 0o600
    assert _mode(secrets_dir / "postgres-password") == 0o600
    # Read by Redis's own user through a bind mount; the 0700 directory keeps others out.
    assert _mode(secrets_dir / "redis.conf") == 0o644
    assert sorted(p.name for p in secrets_dir.iterdir()) == [
        "lmgate.env",
        "postgres-password",
        "redis.conf",
    ]
    assert _mode(directory / "tls") == 0o700 and list((directory / "tls").iterdir()) == []
    assert _mode(directory / "nginx") == 0o755 and _mode(directory / "acme") == 0o755

    database, cache, signing = _secrets(directory)
    assert len({database, cache, signing}) == 3
    assert all(len(value) >= 43 for value in (database, cache, signing))  # 32 random bytes
    assert (secrets_dir / "postgres-password").read_text() == database
    shared = _env(secrets_dir / "lmgate.env")
    assert shared["LMGATE_SECRET_STATE_DATABASE_URL"] == (
        f"postgresql://lmgate:{database}@postgres:5432/lmgate"
    )
    assert shared["LMGATE_SECRET_STATE_REDIS_URL"] == f"redis://:{cache}@redis:6379/0"
    redis_conf = (secrets_dir / "redis.conf").read_text().splitlines()
    assert f"requirepass {cache}" in redis_conf

    # No secret in what is not a secret file, nor on the terminal.
    public = [
        (directory / "compose.yaml").read_text(),
        (directory / "nginx" / "lmgate.conf").read_text(),
        printed,
    ]
    for value in (database, cache, signing):
        assert not any(value in text for text in public)


def test_compose_yaml_keeps_the_state_private_and_trusts_only_nginx(
    project: tuple[Path, str],
) -> None:
    directory, _ = project
    compose = _compose(directory)
    services = compose["services"]
    assert set(services) == {"nginx", "lmgate-1", "lmgate-2", "postgres", "redis"}
    # Nothing but nginx is published.
    assert {name for name, s in services.items() if "ports" in s} == {"nginx"}
    assert services["nginx"]["ports"] == ["80:80", "443:443"]

    edge, state = compose["networks"]["edge"], compose["networks"]["state"]
    assert state == {"internal": True} and not edge.get("internal")
    (pool,) = edge["ipam"]["config"]
    nginx_address = services["nginx"]["networks"]["edge"]["ipv4_address"]
    # Fixed, inside the subnet, and outside the range replicas are given addresses from.
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(pool["subnet"])
    assert ipaddress.ip_address(nginx_address) not in ipaddress.ip_network(pool["ip_range"])
    assert list(services["nginx"]["networks"]) == ["edge"]
    assert services["nginx"]["image"] == "nginx:stable-bookworm"
    # The site file alone (a file planted in nginx/ is never loaded), the certificate, and
    # the ACME webroot the site serves the challenge from.
    assert services["nginx"]["volumes"] == [
        "./nginx/lmgate.conf:/etc/nginx/conf.d/default.conf:ro",
        "./tls:/etc/nginx/tls:ro",
        "./acme:/var/www/html:ro",
    ]
    assert "root /var/www/html;" in (directory / "nginx" / "lmgate.conf").read_text()
    assert services["nginx"]["depends_on"] == ["lmgate-1", "lmgate-2"]
    nginx = services["nginx"]
    assert nginx["cap_drop"] == ["ALL"]
    assert set(nginx["cap_add"]) <= {
        "CHOWN", "SETUID", "SETGID", "NET_BIND_SERVICE", "DAC_OVERRIDE"
    }  # fmt: skip
    # open_by_handle_at (the "Shocker" escape) is allowed with it: never granted.
    assert "DAC_READ_SEARCH" not in nginx["cap_add"]
    assert nginx["read_only"] is True and "/var/cache/nginx" in nginx["tmpfs"]
    for name in ("nginx", "postgres", "redis", "lmgate-1"):
        assert services[name]["security_opt"] == ["no-new-privileges:true"], name

    for name in ("lmgate-1", "lmgate-2"):
        replica = services[name]
        assert replica["image"] == "lmgate"
        assert replica["environment"] == {
            "LMGATE_STATE_BACKEND": "postgres",
            "LMGATE_SECRETS_STORE": "env",
            "LMGATE_UPSTREAM_URL": "http://host.docker.internal:1234",
            "LMGATE_SERVER_ALLOWED_HOSTS": DOMAIN,
            "LMGATE_SERVER_TRUSTED_PROXIES": f"{nginx_address}/32",
        }
        assert replica["env_file"] == "secrets/lmgate.env"
        assert replica["extra_hosts"] == ["host.docker.internal:host-gateway"]
        assert replica["networks"] == ["edge", "state"]
        assert replica["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
        grace = float(replica["stop_grace_period"].removesuffix("s"))
        assert grace > Config().server_shutdown_grace

    postgres, redis = services["postgres"], services["redis"]
    assert postgres["image"] == "postgres:15-bookworm" and redis["image"] == "redis:7-bookworm"
    assert postgres["networks"] == ["state"] and redis["networks"] == ["state"]
    # The password from a mounted file: in no container's environment.
    assert "env_file" not in postgres
    assert postgres["environment"] == {
        "POSTGRES_USER": "lmgate",
        "POSTGRES_DB": "lmgate",
        "POSTGRES_PASSWORD_FILE": "/run/secrets/postgres-password",
    }
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert postgres["volumes"] == [
        "postgres-data:/var/lib/postgresql/data",
        "./secrets/postgres-password:/run/secrets/postgres-password:ro",
    ]
    assert set(compose["volumes"]) == {"postgres-data", "lmgate-1-data", "lmgate-2-data"}
    assert services["lmgate-2"]["volumes"] == ["lmgate-2-data:/data"]
    assert redis["command"] == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert redis["volumes"] == ["./secrets/redis.conf:/usr/local/etc/redis/redis.conf:ro"]
    # The replica template is one YAML anchor, not N copies.
    assert (directory / "compose.yaml").read_text().count("<<: *lmgate") == 2


def test_compose_v1_reads_the_file_as_valid(project: tuple[Path, str]) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (tests/run.sh installs it as root)")
    directory, _ = project
    checked = subprocess.run(
        ["docker-compose", "-f", str(directory / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_the_site_is_what_deploy_nginx_writes_for_those_replicas(
    project: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    site = Deployment(
        domain=DOMAIN,
        replicas=("lmgate-1:8787", "lmgate-2:8787"),
        certificate="/etc/nginx/tls/fullchain.pem",
        certificate_key="/etc/nginx/tls/privkey.pem",
    ).validate()
    assert (directory / "nginx" / "lmgate.conf").read_text() == nginx_site(site)
    # And `deploy nginx` itself, given the same, writes the same.
    code, _, err = _run_nginx(capsys, tmp_path / "nginx")
    assert code == 0, err
    assert (tmp_path / "nginx" / "lmgate-nginx.conf").read_text() == nginx_site(site)

    one = tmp_path / "one"
    code, _, err = _run(capsys, "--domain", DOMAIN, "--replicas", "1", "--output", str(one))
    assert code == 0, err
    single = (one / "nginx" / "lmgate.conf").read_text()
    assert "upstream" not in single and "proxy_pass http://lmgate-1:8787;" in single
    assert set(_compose(one)["services"]) == {"nginx", "lmgate-1", "postgres", "redis"}


def _run_nginx(capsys: pytest.CaptureFixture[str], output: Path) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(
        [
            "deploy", "nginx", "--domain", DOMAIN, "--output", str(output),
            "--replica", "lmgate-1:8787", "--replica", "lmgate-2:8787",
            "--certificate", "/etc/nginx/tls/fullchain.pem",
            "--certificate-key", "/etc/nginx/tls/privkey.pem",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def test_the_next_steps_are_printed(project: tuple[Path, str]) -> None:
    directory, printed = project
    compose = f"docker compose -f {directory / 'compose.yaml'}"
    assert "docker build -f packaging/Dockerfile -t lmgate ." in printed
    assert f"{compose} up -d" in printed
    assert f"{compose} exec lmgate-1 lmgate key create" in printed
    assert "fullchain.pem" in printed and "privkey.pem" in printed
    assert "openssl req -x509" in printed


def test_a_rerun_keeps_the_secrets_and_rewrites_the_rest(
    project: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    secret_files = sorted((directory / "secrets").iterdir())
    before = {path: path.read_bytes() for path in secret_files}
    (directory / "tls" / "fullchain.pem").write_text("a certificate")
    code, out, err = _run(
        capsys, "--domain", "llm2.example.com", "--replicas", "3", "--output", str(directory)
    )
    assert code == 0, err
    assert {path: path.read_bytes() for path in secret_files} == before
    assert "Kept the secrets" in out
    assert set(_compose(directory)["services"]) >= {"lmgate-3"}
    assert "server lmgate-3:8787" in (directory / "nginx" / "lmgate.conf").read_text()
    assert "llm2.example.com" in (directory / "compose.yaml").read_text()
    assert (directory / "tls" / "fullchain.pem").read_text() == "a certificate"


def test_half_a_set_of_secrets_is_refused_and_nothing_is_written(
    project: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    (directory / "secrets" / "postgres-password").unlink()
    compose_before = (directory / "compose.yaml").read_bytes()
    code, out, err = _run(capsys, "--domain", DOMAIN, "--replicas", "3", "--output", str(directory))
    assert code == 2 and out == ""
    assert err.startswith("lmgate: --output: ") and "postgres-password" in err
    assert len(err.strip().splitlines()) == 1
    assert (directory / "compose.yaml").read_bytes() == compose_before
    assert not (directory / "secrets" / "postgres-password").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--domain", "not a domain"], "lmgate: --domain: "),
        (["--domain", "localhost"], "lmgate: --domain: "),
        (["--domain", DOMAIN, "--replicas", "0"], "lmgate: --replicas: must be between 1 and 8"),
        (["--domain", DOMAIN, "--replicas", "9"], "lmgate: --replicas: must be between 1 and 8"),
        (["--domain", DOMAIN, "--upstream-url", "ftp://x"], "lmgate: --upstream-url: "),
        (["--domain", DOMAIN, "--upstream-url", "http://a b:1"], "lmgate: --upstream-url: "),
        (["--domain", DOMAIN, "--image", "Bad Image"], "lmgate: --image: "),
        (["--domain", DOMAIN, "--image", 'x"\ny: 1'], "lmgate: --image: "),
        # `$` in a pattern also matches before a trailing newline: each is matched whole.
        (["--domain", DOMAIN + "\n"], "lmgate: --domain: "),
        (["--domain", DOMAIN, "--image", "lmgate\n"], "lmgate: --image: "),
        (["--domain", DOMAIN, "--subnet", "10.87.87.0/33"], "lmgate: --subnet: "),
        (["--domain", DOMAIN, "--subnet", "10.87.87.1/27"], "lmgate: --subnet: "),
        (["--domain", DOMAIN, "--subnet", "8.8.8.0/27"], "lmgate: --subnet: "),
        (["--domain", DOMAIN, "--subnet", "10.87.87.0/30"], "lmgate: --subnet: "),
        (["--domain", DOMAIN, "--subnet", "10.87.87.0/27\n"], "lmgate: --subnet: "),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    output = tmp_path / "team"
    code, out, err = _run(capsys, *args, "--output", str(output))
    assert code == 2 and out == ""
    assert err.startswith(said), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not output.exists()


def test_an_image_may_name_a_registry_a_tag_and_a_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = "registry.example.com:5000/team/lmgate:1.4@sha256:" + "a" * 64
    code, out, err = _run(capsys, "--domain", DOMAIN, "--image", image, "--output", str(tmp_path))
    assert code == 0, err
    assert _compose(tmp_path)["services"]["lmgate-1"]["image"] == image
    assert f"docker build -f packaging/Dockerfile -t {image} ." in out


def test_an_output_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "team"
    output.write_text("not a directory")
    code, _, err = _run(capsys, "--domain", DOMAIN, "--output", str(output))
    assert code == 2 and err.startswith("lmgate: --output: ")
    assert output.read_text() == "not a directory"


def test_secret_files_are_never_readable_by_others_even_with_a_loose_umask(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0)
    try:
        code, _, err = _run(capsys, "--domain", DOMAIN, "--output", str(tmp_path / "t"))
    finally:
        os.umask(old)
    assert code == 0, err
    assert _mode(tmp_path / "t" / "secrets") == 0o700
    assert _mode(tmp_path / "t" / "tls") == 0o700
    assert _mode(tmp_path / "t" / "secrets" / "lmgate.env") == 0o600


# The output directory is trusted: Compose runs what compose.yaml says, nginx loads its site,
# the secrets are written there. Each of these was accepted before the checks (review).


def _refused(capsys: pytest.CaptureFixture[str], output: Path, said: str) -> str:
    code, out, err = _run(capsys, "--domain", DOMAIN, "--output", str(output))
    assert code == 2 and out == "", err
    assert err.startswith("lmgate: --output: ") and said in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_an_output_that_is_a_symlink_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "team").symlink_to(real)
    _refused(capsys, tmp_path / "team", "is a symbolic link")
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("sub", ["secrets", "tls", "nginx", "acme"])
def test_a_subdirectory_that_is_a_symlink_is_refused_and_not_written_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str
) -> None:
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    attacker.chmod(0o777)
    directory = tmp_path / "team"
    directory.mkdir()
    (directory / sub).symlink_to(attacker)
    _refused(capsys, directory, f"{directory / sub} is a symbolic link")
    assert list(attacker.iterdir()) == [] and _mode(attacker) == 0o777
    assert not (directory / "compose.yaml").exists()


@pytest.mark.parametrize("sub", ["", "secrets", "tls", "nginx", "acme"])
def test_a_directory_others_may_write_to_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str
) -> None:
    directory = tmp_path / "team"
    (directory / sub).mkdir(parents=True)
    (directory / sub).chmod(0o777)
    _refused(capsys, directory, "is writable by other users: run `chmod go-w")
    (directory / sub).chmod(0o775)  # the group alone is one too many
    _refused(capsys, directory, "is writable by other users")
    assert not (directory / "compose.yaml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
@pytest.mark.parametrize("sub", ["", "secrets", "nginx"])
def test_a_directory_of_another_user_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sub: str
) -> None:
    directory = tmp_path / "team"
    (directory / sub).mkdir(parents=True)
    os.chown(directory / sub, 12345, 12345)
    _refused(capsys, directory, "belongs to another user (uid 12345)")
    assert not (directory / "compose.yaml").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_kept_secret_file_of_another_user_is_refused(
    project: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    os.chown(directory / "secrets" / "lmgate.env", 12345, 12345)
    _refused(capsys, directory, "lmgate.env belongs to another user (uid 12345)")


def test_a_rerun_sets_the_modes_again(
    project: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    (directory / "tls").chmod(0o755)
    (directory / "nginx").chmod(0o700)  # nginx's workers could not read the site
    (directory / "secrets").chmod(0o755)
    for name in ("lmgate.env", "postgres-password"):
        (directory / "secrets" / name).chmod(0o644)
    (directory / "secrets" / "redis.conf").chmod(0o600)  # Redis's user could not read it
    code, out, err = _run(capsys, "--domain", DOMAIN, "--output", str(directory))
    assert code == 0 and "Kept the secrets" in out, err
    assert _mode(directory / "tls") == 0o700 and _mode(directory / "nginx") == 0o755
    assert _mode(directory / "secrets") == 0o700
    assert _mode(directory / "secrets" / "lmgate.env") == 0o600
    assert _mode(directory / "secrets" / "postgres-password") == 0o600
    assert _mode(directory / "secrets" / "redis.conf") == 0o644


def test_a_file_planted_as_compose_yaml_link_is_replaced_not_followed(
    project: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _ = project
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("untouched")
    (directory / "compose.yaml").unlink()
    (directory / "compose.yaml").symlink_to(elsewhere)
    code, _, err = _run(capsys, "--domain", DOMAIN, "--output", str(directory))
    assert code == 0, err
    assert elsewhere.read_text() == "untouched"
    assert not (directory / "compose.yaml").is_symlink() and _compose(directory)["services"]


def test_the_upstream_url_and_the_domain_are_written_normalised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys,
        "--domain", "LLM.Example.com",
        "--upstream-url", " http://lmstudio.lan:1234/ ",
        "--output", str(tmp_path / "t"),
    )  # fmt: skip
    assert code == 0, err
    environment = _compose(tmp_path / "t")["services"]["lmgate-1"]["environment"]
    assert environment["LMGATE_UPSTREAM_URL"] == "http://lmstudio.lan:1234"
    assert environment["LMGATE_SERVER_ALLOWED_HOSTS"] == DOMAIN


def test_another_subnet_moves_nginx_and_the_trusted_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        capsys, "--domain", DOMAIN, "--subnet", "192.168.240.0/24", "--output", str(tmp_path)
    )
    assert code == 0, err
    compose = _compose(tmp_path)
    assert compose["networks"]["edge"]["ipam"]["config"] == [
        {"subnet": "192.168.240.0/24", "ip_range": "192.168.240.0/25"}
    ]
    nginx = compose["services"]["nginx"]["networks"]["edge"]["ipv4_address"]
    assert nginx == "192.168.240.254"
    trusted = compose["services"]["lmgate-2"]["environment"]["LMGATE_SERVER_TRUSTED_PROXIES"]
    assert trusted == "192.168.240.254/32"
    assert "! -s 192.168.240.0/24 -j DROP" in out


def test_deploy_nginx_refuses_a_domain_with_a_trailing_newline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    code = main(["deploy", "nginx", "--domain", DOMAIN + "\n", "--output", str(tmp_path / "n")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("lmgate: --domain: ")
    assert not (tmp_path / "n").exists()


def test_the_instructions_give_absolute_paths_lm_studio_and_certbot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "--domain", DOMAIN, "--output", "team")
    assert code == 0, err
    absolute = tmp_path / "team"
    assert f"docker compose -f {absolute / 'compose.yaml'} up -d" in out
    assert f"-keyout {absolute / 'tls' / 'privkey.pem'}" in out
    assert "Serve on Local Network" in out
    assert "iptables -I INPUT -p tcp --dport 1234 ! -i lo ! -s 10.87.87.0/27 -j DROP" in out
    assert "ip6tables -I INPUT -p tcp --dport 1234 ! -i lo -j DROP" in out
    assert f"certbot certonly --webroot -w {absolute / 'acme'} -d {DOMAIN}" in out
    assert "nginx -s reload" in out and "logs nginx" in out
    assert "--remove-orphans" in out and "restart nginx" in out
    assert "down -v` deletes every key, device, conversation and audit entry" in out


def test_nginx_starts_only_with_the_certificate_and_says_where_it_goes(
    project: tuple[Path, str],
) -> None:
    directory, _ = project
    command = _compose(directory)["services"]["nginx"]["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("$$", "$")  # as Compose hands it over
    tls = directory / "tls"
    empty = subprocess.run(
        ["sh", "-c", script.replace("/etc/nginx/tls", str(tls)).replace("exec nginx", "echo")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert empty.returncode == 1 and empty.stdout == ""
    assert empty.stderr == (
        f"lmgate: no certificate: put fullchain.pem and privkey.pem in {tls} on the host "
        "(README, With Docker Compose), then restart nginx\n"
    )


@pytest.mark.parametrize(
    ("subnet", "replicas"),
    [
        ("127.0.0.0/24", 2),  # loopback: "private" to Python, no bridge's
        ("169.254.0.0/16", 2),  # link-local
        ("198.18.0.0/15", 2),  # benchmarking, reserved
        ("240.0.0.0/16", 2),
        ("10.9.9.0/28", 7),  # 8 addresses for the replicas, less two: room for 6
    ],
)
def test_a_subnet_that_is_not_rfc_1918_or_too_small_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], subnet: str, replicas: int
) -> None:
    code, _, err = _run(
        capsys, "--domain", DOMAIN, "--subnet", subnet, "--replicas", str(replicas),
        "--output", str(tmp_path / "p"),
    )  # fmt: skip
    assert code == 2 and err.startswith("lmgate: --subnet: "), err
    assert not (tmp_path / "p").exists()


def test_a_subnet_just_large_enough_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "--domain", DOMAIN, "--subnet", "10.9.9.0/28", "--replicas", "6",
        "--output", str(tmp_path),
    )  # fmt: skip
    assert code == 0, err


def test_a_dollar_in_a_value_is_no_variable_for_compose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        capsys, "--domain", DOMAIN, "--upstream-url", "http://$HOME:1234", "--output",
        str(tmp_path),
    )  # fmt: skip
    assert code == 0, err
    text = (tmp_path / "compose.yaml").read_text()
    assert 'LMGATE_UPSTREAM_URL: "http://$$HOME:1234"' in text
    assert "$HOME" not in text.replace("$$HOME", "")


def test_deploy_nginx_refuses_a_domain_that_is_not_ascii(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    kelvin = "llm.\u212axample.com"  # lower() makes it "k"
    code = main(["deploy", "nginx", "--domain", kelvin, "--output", str(tmp_path / "n")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("lmgate: --domain: ")
    assert not (tmp_path / "n").exists()


def test_a_place_another_user_may_write_to_above_the_project_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may move the project aside
    code, _, err = _run(capsys, "--domain", DOMAIN, "--output", str(shared / "proj"))
    assert code == 2 and "may be written by others" in err, err
    assert not (shared / "proj").exists()
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner may rename what is theirs
    code, _, err = _run(capsys, "--domain", DOMAIN, "--output", str(shared / "proj"))
    assert code == 0, err
