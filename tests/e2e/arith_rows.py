"""Addition problems as GSM8K-style JSONL rows (question, answer, worked solution), for the
end-to-end tests' small data sets."""
import json
from pathlib import Path

from rl.tasks.arith import column_steps

# The shared e2e data set (tests/e2e/conftest.py): 4 training rows, so step 2 → 3 of a run
# crosses an epoch boundary, and 2 held-out rows.
ROWS = [(347, 285), (12, 990), (505, 55), (81, 19)]
TEST_ROWS = [(100, 23), (64, 64)]


def write_rows(path: Path, rows) -> str:
    with open(path, "w") as f:
        for a, b in rows:
            steps, total = column_steps([a, b])
            f.write(json.dumps({"question": f"{a}+{b}", "answer": str(total),
                                "solution": "\n".join(steps + [f"#### {total}"])}) + "\n")
    return str(path)
