"""Output that fits the limit comes back whole; output past it comes back as its first and last
bytes, the limit in all, with a marker naming what was left out. Checked at every size around
the limit, for a stream fed in chunks (BoundedOutput) and for a file (read_bounded)."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from arservice.environments.process import BoundedOutput, read_bounded

limits = st.integers(min_value=1, max_value=4096)


def expected(data, limit):
    if len(data) <= limit:
        return data, False
    head, tail = data[: limit // 2], data[len(data) - (limit - limit // 2):]
    return head + f"\n[... {len(data) - limit} bytes truncated ...]\n".encode() + tail, True


@st.composite
def output_and_limit(draw):
    """A limit, and output of a size near it (within 3 bytes, or anywhere up to four times it)."""
    limit = draw(limits)
    size = draw(st.one_of(st.integers(max(0, limit - 3), limit + 3), st.integers(0, 4 * limit)))
    return draw(st.binary(min_size=size, max_size=size)), limit


@settings(max_examples=400, deadline=None)
@given(output_and_limit(), st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_a_stream_keeps_what_fits_whole_and_head_and_tail_of_the_rest(case, chunk_sizes):
    data, limit = case
    bounded, offset, i = BoundedOutput(limit), 0, 0
    while offset < len(data):
        size = chunk_sizes[i % len(chunk_sizes)]
        bounded.feed(data[offset: offset + size])
        offset, i = offset + size, i + 1
    assert bounded.value() == expected(data, limit)


@settings(max_examples=300, deadline=None)
@given(output_and_limit(), st.integers(0, 8192) | st.none())
def test_a_file_keeps_what_fits_whole_and_head_and_tail_of_the_rest(tmp_path_factory, case, upto):
    data, limit = case
    path = tmp_path_factory.mktemp("out") / "out"
    path.write_bytes(data)
    kept = data if upto is None else data[:upto]
    assert read_bounded(str(path), limit, upto) == expected(kept, limit)


def test_every_size_around_the_default_limit_of_a_mebibyte():
    limit = 1 << 20
    for size in (900_000, 1_000_000, limit - 1, limit, limit + 1):
        bounded = BoundedOutput(limit)
        for offset in range(0, size, 65536):
            bounded.feed(b"x" * min(65536, size - offset))
        output, truncated = bounded.value()
        assert truncated == (size > limit)
        assert len(output) == size if size <= limit else re.search(rb"\[\.\.\. 1 bytes truncated", output)
