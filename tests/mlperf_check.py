"""MLPerf's compliance checker on an MLLOG file, for the tests."""

import json
import re

from conftest import PYTHON, run_process


def compliance_failures(path, ruleset: str) -> dict[str, str]:
    """Run ``python -m mlperf_logging.compliance_checker`` on the MLLOG
    file ``path``; return each failing key with its message (a message
    naming no key fails under ``"?"``)."""
    code, out = run_process([PYTHON, "-m", "mlperf_logging.compliance_checker", "--usage",
                             "training", "--ruleset", ruleset, str(path), "--log_output",
                             f"{path}.checker"], cwd=path.parent)
    failures, chatter = {}, ("INFO", "**", "ERROR - FAILED")
    for block in out.split("-" * 30):
        message = "\n".join(line for line in block.splitlines()
                            if line.strip() and not line.startswith(chatter))
        if not message:
            continue
        keys = (re.findall(r"occurrence of '(\w+)'", message)
                or re.findall(r"CHECK for '(\w+)' failed", message)
                or re.findall(r"Failed checks for (\w+) :", message) or ["?"])
        failures.update({key: message for key in keys})
    assert (code == 0) == (not failures), out[-3000:]
    assert ("SUCCESS" in out) == (code == 0)
    return failures


def mllog_events(path) -> list[dict]:
    """The ``:::MLLOG`` lines of ``path``, decoded."""
    return [json.loads(line.removeprefix(":::MLLOG ")) for line in path.read_text().splitlines()]
