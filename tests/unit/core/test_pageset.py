import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.core.pageset import PageSet


def test_members_runs_and_count():
    pages = PageSet(100)
    pages.add(range(10, 20))
    pages.add(range(15, 25))  # overlapping: counted once
    pages.add(range(99, 100))
    assert len(pages) == 16 and pages.runs() == [(10, 15), (99, 1)]
    assert 10 in pages and 24 in pages and 25 not in pages and 100 not in pages and -1 not in pages
    assert "10" not in pages
    pages.remove(range(12, 14))
    assert pages.runs() == [(10, 2), (14, 11), (99, 1)] and len(pages) == 14
    assert pages.runs(range(11, 16)) == [(11, 1), (14, 2)]  # cut to the range asked about
    assert pages.runs(range(200, 300)) == [] and pages.runs(range(-5, 11)) == [(10, 1)]
    assert list(PageSet(8, [5, 1, 2])) == [1, 2, 5]
    pages.clear()
    assert len(pages) == 0 and pages.runs() == []


def test_any_and_all():
    pages = PageSet(16, range(4, 8))
    assert pages.any_in(range(0, 5)) and not pages.any_in(range(0, 4)) and not pages.any_in(range(8, 100))
    assert pages.all_in(range(4, 8)) and not pages.all_in(range(3, 8)) and pages.all_in(range(0))
    assert not pages.all_in(range(10, 20)) and not pages.any_in(range(-4, 0))


def test_frames_beyond_the_limit_are_refused():
    pages = PageSet(16)
    for bad in (range(15, 17), range(-1, 2), range(0, 4, 2)):
        with pytest.raises(ValueError):
            pages.add(bad)
        with pytest.raises(ValueError):
            pages.remove(bad)
    pages.add(range(3, 3))  # empty: nothing to do
    assert len(pages) == 0
    with pytest.raises(ValueError):
        PageSet(-1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 63), st.integers(0, 10)), max_size=30))
def test_behaves_as_a_set_of_ints(steps):
    pages, model = PageSet(64), set()
    for adding, first, count in steps:
        span = range(first, min(first + count, 64))
        (pages.add if adding else pages.remove)(span)
        (model.update if adding else model.difference_update)(span)
        assert len(pages) == len(model)
    assert list(pages) == sorted(model)
    for first, count in pages.runs():
        assert first - 1 not in model and first + count not in model
