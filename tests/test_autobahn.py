"""RFC 6455 conformance: Autobahn|Testsuite's fuzzing client against a real greenchat.

With one client connected, the chat endpoint is an echo server (what a client sends is
broadcast to its room, the sender included), which is what wstest's cases 1-10 expect.
Cases 12 and 13 (permessage-deflate) are excluded: greenchat negotiates no extension.

wstest runs on Python 2.7 only, in its own virtualenv under ``.autobahn/`` that
``.ci/install-autobahn`` builds (``make test`` runs it first). The latest summary is
tests/autobahn/RESULTS.md; to refresh it after a run, see that file.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from helpers import ROOT, greenchat_argv

WSTEST = ROOT / ".autobahn" / "wstest" / "bin" / "wstest"
AGENT = "greenchat"
CASES = [f"{n}.*" for n in range(1, 11)]
EXCLUDED = ["12.*", "13.*"]
# How many cases autobahntestsuite 25.10.1 (pinned in .ci/install-autobahn) has in 1-10:
# a run that silently skipped cases or connected nowhere must not pass.
EXPECTED_CASES = 301
ALLOWED = {"OK", "NON-STRICT", "INFORMATIONAL"}
# Case 9 sends messages of up to 16 MiB, and the echo of one does not fit in the kernel's
# send buffer: the server must accept such messages and queue such a backlog.
SERVER_ENV = {
    "CHAT_MAX_MESSAGE_SIZE": str(16 << 20),
    "CHAT_MAX_BACKLOG": str(64 << 20),
    "CHAT_RATE_LIMIT": "0",
}
WSTEST_TIMEOUT = 600  # seconds; the whole run takes well under a minute here


def case_key(case: str) -> tuple[int, ...]:
    """Sort "9.10.2" after "9.2.1"."""
    return tuple(int(part) for part in case.split("."))


def run_wstest(ws_url: str, outdir: Path) -> dict[str, dict]:
    """Run wstest's fuzzing client against ``ws_url``; return {case: result} from index.json."""
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": AGENT, "url": ws_url}],
        "cases": CASES,
        "exclude-cases": EXCLUDED,
        "exclude-agent-cases": {},
    }
    spec_file = outdir.parent / "spec.json"
    spec_file.write_text(json.dumps(spec))
    run = subprocess.run(
        [str(WSTEST), "-m", "fuzzingclient", "-s", str(spec_file)], cwd=outdir.parent,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WSTEST_TIMEOUT,
    )
    index = outdir / "index.json"
    assert run.returncode == 0 and index.exists(), (
        f"wstest exited with {run.returncode} and no report:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return json.loads(index.read_text())[AGENT]


def why(outdir: Path, case: str, result: dict) -> str:
    """One line per failed case: its behaviours, description and what wstest saw."""
    report = json.loads((outdir / result["reportfile"]).read_text())
    description = " ".join(report["description"].replace("<br>", " ").split())
    return (f"{case}: behavior {result['behavior']}, close {result['behaviorClose']}: "
            f"{description[:200]} -> {report['result']} / {report['resultClose']}")


def summary(results: dict[str, dict]) -> str:
    """Counts per behaviour and the non-OK cases with wstest's own verdict (for RESULTS.md)."""
    counts = Counter(result["behavior"] for result in results.values())
    case_9_ms = sum(result["duration"] for case, result in results.items() if case.startswith("9."))
    lines = [", ".join(f"{behavior}: {n}" for behavior, n in counts.most_common()),
             f"case 9 (throughput) took {case_9_ms / 1000:.1f} s"]
    for case in sorted(results, key=case_key):
        result = results[case]
        if result["behavior"] != "OK" or result["behaviorClose"] != "OK":
            lines.append(f"{case} {result['behavior']} (close {result['behaviorClose']}, "
                         f"code {result.get('remoteCloseCode')})")
    return "\n".join(lines)


@pytest.mark.slow
def test_autobahn_fuzzing_client_cases_1_to_10_have_no_failure(start_server, tmp_path):
    if not WSTEST.exists():
        message = "Autobahn|Testsuite is not installed: run .ci/install-autobahn"
        if os.environ.get("CI"):
            raise RuntimeError(message)
        pytest.skip(message)
    server = start_server(greenchat_argv(), env=SERVER_ENV)
    outdir = tmp_path / "reports"
    outdir.mkdir()

    results = run_wstest(server.ws_url, outdir)
    print(summary(results))  # shown with -s or -rA: the figures for RESULTS.md

    failed = [why(outdir, case, results[case]) for case in sorted(results, key=case_key)
              if not ALLOWED >= {results[case]["behavior"], results[case]["behaviorClose"]}]
    assert not failed, f"{len(failed)} Autobahn cases failed:\n" + "\n".join(failed)
    assert len(results) == EXPECTED_CASES, f"wstest ran {len(results)} cases"
    assert "Traceback" not in server.output, server.output[-3000:]
