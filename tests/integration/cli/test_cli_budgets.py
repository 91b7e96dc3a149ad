"""`lmgate token/key create --budget-*`, `lmgate budget set/show`, `lmgate usage` and `lmgate
audit` through the CLI's entry (``main``, as the installed command calls it, and once the
installed command itself) on a real database in a temporary directory."""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import Env
from tests.integration.cli.in_process import Run, key_id, token_jti
from tray_app.storage.budgets import Budget, BudgetStore
from tray_app.storage.database import DAY, HOUR, Database, UsageRow


class TestBudgetsAtCreation:
    def test_a_token_and_a_key_are_made_with_their_budgets(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        code, _, err = lmgate("token", "create", "bob", "--budget-day", "1000")
        assert code == 0
        jti = token_jti(err)
        assert ", budget 1,000/day, no monthly cap." in err  # said where it is made
        code, out, err = lmgate("key", "create", "ci", "--budget-month", "50000")
        assert code == 0
        kid = key_id(out, err)
        assert "budget no daily cap, 50,000/month." in err
        assert BudgetStore(db()).all() == {
            f"token:{jti}": Budget(1000, None),
            f"key:{kid}": Budget(None, 50000),
        }

    def test_a_credential_made_without_a_budget_has_none(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        code, _, err = lmgate("key", "create", "ci")
        assert code == 0 and "budget" not in err
        assert BudgetStore(db()).all() == {}

    @pytest.mark.parametrize("command", ["token", "key"])
    @pytest.mark.parametrize("flag", ["--budget-day", "--budget-month"])
    def test_a_budget_must_be_at_least_one_token(
        self, lmgate: Run, db: Callable[[], Database], command: str, flag: str
    ) -> None:
        for refused in ("0", "-5"):
            code, out, err = lmgate(command, "create", "x", flag, refused)
            assert code == 2, err
            assert f"{flag}: must be a positive number of tokens" in err
            assert out == ""  # nothing made, no secret printed
        assert lmgate(command, "create", "x", flag, "1")[0] == 0
        assert list(BudgetStore(db()).all().values()) in ([Budget(1, None)], [Budget(None, 1)])


class TestBudgetSet:
    def test_by_name_by_principal_and_by_the_start_of_an_id(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        kid = key_id(*lmgate("key", "create", "alice")[1:])
        jti = token_jti(lmgate("token", "create", "bob")[2])
        code, out, _ = lmgate("budget", "set", "alice", "--day", "2,000")
        assert code == 0
        assert "key:" + kid in out and "2,000/day" in out
        assert lmgate("budget", "set", f"key:{kid[:4]}", "--month", "9000")[0] == 0
        assert lmgate("budget", "set", jti[:6], "--day", "5")[0] == 0
        assert BudgetStore(db()).all() == {
            f"key:{kid}": Budget(2000, 9000),
            f"token:{jti}": Budget(5, None),
        }
        # One given, the other kept; none clears it.
        assert lmgate("budget", "set", f"key:{kid}", "--day", "none")[0] == 0
        assert BudgetStore(db()).get(f"key:{kid}") == Budget(None, 9000)
        assert lmgate("budget", "set", "alice", "--month", "none")[0] == 0
        assert BudgetStore(db()).get(f"key:{kid}") is None

    def test_a_device_is_named_by_its_device_id(
        self, lmgate: Run, db: Callable[[], Database], data: Path
    ) -> None:
        database = db()
        with database.transaction() as conn:
            conn.execute(
                "INSERT INTO devices (id, name, created) VALUES ('abcdef123456', 'tab', 1)"
            )
        assert lmgate("budget", "set", "device:abc", "--day", "10")[0] == 0
        assert lmgate("budget", "set", "tab", "--month", "20")[0] == 0
        assert BudgetStore(database).get("device:abcdef123456") == Budget(10, 20)

    @pytest.mark.parametrize(
        ("args", "problem"),
        [
            (["nobody", "--day", "1"], "no credential is called 'nobody'"),
            (["key:ffff", "--day", "1"], "no credential is called 'key:ffff'"),
            (["twin", "--day", "1"], "'twin' could be 2 credentials: key:"),
            (
                ["solo", "--day", "12x"],
                "--day: must be a number of tokens (100000, 100,000, 100k, 2M) or none, got '12x'",
            ),
            (["solo", "--month", "0"], "--month: must be a positive number of tokens, got 0"),
            (["solo", "--day", "-1"], "--day: must be a positive number of tokens, got -1"),
            (["solo"], "say what to change: --day N|none, --month N|none, or both"),
        ],
    )
    def test_what_cannot_be_set_is_a_clear_usage_error(
        self, lmgate: Run, db: Callable[[], Database], args: list[str], problem: str
    ) -> None:
        for name in ("twin", "twin", "solo"):
            assert lmgate("key", "create", name)[0] == 0
        code, out, err = lmgate("budget", "set", *args)
        assert (code, out) == (2, "")
        assert problem in err
        assert BudgetStore(db()).all() == {}

    def test_a_revoked_credential_gets_no_budget_and_a_live_namesake_wins(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        old = key_id(*lmgate("key", "create", "phone-app")[1:])
        assert lmgate("key", "revoke", old)[0] == 0
        code, _, err = lmgate("budget", "set", "phone-app", "--day", "5")
        assert code == 2 and "is revoked or expired" in err
        new = key_id(*lmgate("key", "create", "phone-app")[1:])
        assert lmgate("budget", "set", "phone-app", "--day", "5")[0] == 0
        assert BudgetStore(db()).all() == {f"key:{new}": Budget(5, None)}

    def test_a_change_is_in_the_audit_trail_as_made_at_the_cli(self, lmgate: Run) -> None:
        assert lmgate("key", "create", "alice", "--budget-day", "100")[0] == 0
        assert lmgate("budget", "set", "alice", "--day", "200")[0] == 0
        code, out, _ = lmgate("audit", "--csv")
        assert code == 0
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [(r["action"], r["name"], r["from"]) for r in rows] == [
            ("created", "alice", "cli"),
            ("budget_changed", "alice", "cli"),
        ]
        assert rows[1]["detail"] == "200/day, no monthly cap (was 100/day, no monthly cap)"


class TestBudgetShow:
    def test_lists_each_live_credential_with_its_budget_and_use(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        kid = key_id(*lmgate("key", "create", "alice", "--budget-day", "2000")[1:])
        gone = key_id(*lmgate("key", "create", "old")[1:])
        assert lmgate("key", "revoke", gone)[0] == 0
        now = int(time.time())
        db().add_usage([UsageRow(f"key:{kid}", 3, 1000, 500, now, hour=now // HOUR * HOUR)])
        code, out, _ = lmgate("budget", "show")
        assert code == 0
        lines = out.splitlines()
        assert " ".join(lines[0].split()) == (
            "PRINCIPAL NAME KIND PER DAY PER MONTH USED TODAY THIS MONTH"
        )
        assert lines[1].split() == [f"key:{kid}", "alice", "key", "2,000", "none", "1,500", "1,500"]
        assert len(lines) == 2  # the revoked key is not listed
        code, out, _ = lmgate("budget", "show", "old")  # asked for by name, it is
        assert code == 0 and f"key:{gone}" in out


class TestUsage:
    @pytest.fixture
    def used(self, lmgate: Run, db: Callable[[], Database]) -> tuple[str, int]:
        kid = key_id(*lmgate("key", "create", "alice", "--budget-day", "2000")[1:])
        now = int(time.time())
        hour = now // HOUR * HOUR
        database = db()
        database.add_usage(
            [
                UsageRow(f"key:{kid}", 2, 1000, 500, now, hour=hour),
                # Ten days ago: in the totals and this month's days maybe, never in today's.
                UsageRow(f"key:{kid}", 1, 10, 20, now - 10 * DAY, hour=hour - 10 * DAY),
            ]
        )
        return kid, hour

    def test_totals_per_credential_against_its_budget(
        self, lmgate: Run, used: tuple[str, int]
    ) -> None:
        kid, _ = used
        code, out, _ = lmgate("usage")
        assert code == 0
        row = re.search(rf"^key:{kid}\s+alice\s+3\s+1010\s+520\s+1,500 of 2,000\s", out, re.M)
        assert row, out
        assert out.splitlines()[1].endswith("key")

    def test_since_leaves_out_what_came_before(self, lmgate: Run, used: tuple[str, int]) -> None:
        kid, _ = used
        code, out, _ = lmgate("usage", "--since", "2d")
        assert code == 0
        assert re.search(rf"^key:{kid}\s+alice\s+2\s+1000\s+500\s", out, re.M), out

    def test_csv_has_a_header_and_iso_utc_times(self, lmgate: Run, used: tuple[str, int]) -> None:
        kid, _ = used
        code, out, _ = lmgate("usage", "--csv")
        assert code == 0
        [row] = list(csv.DictReader(io.StringIO(out)))
        assert row["principal"] == f"key:{kid}"
        assert (row["name"], row["kind"], row["requests"]) == ("alice", "key", "3")
        assert (row["tokens_today"], row["budget_day"], row["budget_month"]) == ("1500", "2000", "")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["last_seen"])

    def test_by_hour_is_one_row_per_hour(self, lmgate: Run, used: tuple[str, int]) -> None:
        kid, hour = used
        code, out, _ = lmgate("usage", "--by", "hour", "--since", "1d", "--csv")
        assert code == 0
        rows = list(csv.DictReader(io.StringIO(out)))
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hour))
        assert [(r["start"], r["principal"], r["prompt_tokens"]) for r in rows] == [
            (started, f"key:{kid}", "1000")
        ]
        code, out, _ = lmgate("usage", "--by", "day")  # every day there is
        assert code == 0 and len(out.splitlines()) == 3

    def test_usage_of_no_credential_there_is_still_shown(
        self, lmgate: Run, db: Callable[[], Database]
    ) -> None:
        now = int(time.time())
        hour = now // HOUR * HOUR
        db().add_usage(
            [
                # Counted before each token was its own principal; dev mode; a deleted key.
                UsageRow("token:friend", 1, 1, 1, now, hour=hour),
                UsageRow("dev:ana", 2, 2, 2, now, hour=hour),
                UsageRow("key:0123456789ab", 3, 3, 3, now, hour=hour),
                UsageRow("someone", 4, 4, 4, now, hour=hour),
            ]
        )
        code, out, _ = lmgate("usage", "--since", "1d", "--csv")
        assert code == 0
        rows = {r["principal"]: r for r in csv.DictReader(io.StringIO(out))}
        assert {p: (r["name"], r["kind"]) for p, r in rows.items()} == {
            "token:friend": ("friend (older tokens sharing that name)", "token"),
            "dev:ana": ("", "dev"),
            "key:0123456789ab": ("", "key"),
            "someone": ("", ""),
        }
        # The buckets keep no times; when each was last seen comes from its running totals.
        seen = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        assert {r["last_seen"] for r in rows.values()} == {seen}
        assert rows["dev:ana"]["tokens_today"] == "4"

    def test_a_bad_since_is_a_usage_error(self, lmgate: Run) -> None:
        code, _, err = lmgate("usage", "--since", "soon")
        assert code == 2 and "--since: must be a time ago like 36h or 7d" in err


class TestAudit:
    def test_lists_every_change_with_when_and_from_where(self, lmgate: Run) -> None:
        kid = key_id(*lmgate("key", "create", "alice")[1:])
        assert lmgate("key", "revoke", kid)[0] == 0
        code, out, _ = lmgate("audit")
        assert code == 0
        lines = out.splitlines()
        assert re.fullmatch(r"since \d{4}-\d\d-\d\d \d\d:00 UTC", lines[0])
        assert lines[1].split() == ["WHEN", "ACTION", "WHO", "NAME", "FROM", "DETAIL"]
        assert re.match(
            rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d UTC\s+created\s+key:{kid}\s+alice\s+cli", lines[2]
        )
        assert re.match(rf"^.* UTC\s+revoked\s+key:{kid}\s+alice\s+cli$", lines[3])

    def test_since_leaves_out_older_entries(self, lmgate: Run, db: Callable[[], Database]) -> None:
        assert lmgate("key", "create", "alice")[0] == 0
        with db().transaction() as conn:
            conn.execute("UPDATE audit SET at = at - 40 * 86400")
        assert lmgate("audit")[1].splitlines()[1:] == ["(none)"]
        assert "alice" in lmgate("audit", "--since", "60d")[1]


def test_the_installed_command_sets_and_shows_budgets(env: Env) -> None:
    made = env.run("key", "create", "alice", "--budget-day", "10")
    assert made.returncode == 0, made.stderr
    changed = env.run("budget", "set", "alice", "--month", "100")
    assert changed.returncode == 0, changed.stderr
    assert "10/day, 100/month (was 10/day, no monthly cap)" in changed.stdout
    shown = env.run("budget", "show")
    assert re.search(r"alice\s+key\s+10\s+100\s+0\s+0$", shown.stdout, re.M), shown.stdout
    trail = env.run("audit", "--csv")
    assert trail.stdout.splitlines()[0] == "when,action,who,name,from,detail"
    assert made.stdout.strip() not in trail.stdout  # the key itself is never in the trail
