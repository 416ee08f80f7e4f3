"""The end-to-end tests' shared data: a 4-row JSONL data set of additions (so step 2 → 3 of a
run crosses an epoch boundary) with 2 held-out rows, and one cache folder, so the runs of a
session share one cold start."""
import pytest

from tests.e2e.arith_rows import ROWS, TEST_ROWS, write_rows


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_rows(d / "train.jsonl", ROWS), write_rows(d / "test.jsonl", TEST_ROWS)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))
