from processor.citations import cited_ranks, cited_results
from processor.events import validate_event
from tests.helpers import make_event


def event(results=3):
    return validate_event(make_event(1, results=results))


def test_cited_results_follow_the_order_of_first_citation_each_once():
    text = "Lag grows when processing is slow [2]. It can be measured [1][2], and alerted on [3]. Again [2]."
    assert cited_results(event(), text) == [
        {"rank": 2, "url": "https://example.com/1/2", "title": "Result 2 for 1"},
        {"rank": 1, "url": "https://example.com/1/1", "title": "Result 1 for 1"},
        {"rank": 3, "url": "https://example.com/1/3", "title": "Result 3 for 1"},
    ]


def test_ranks_the_event_does_not_have_are_left_out():
    assert [c["rank"] for c in cited_results(event(results=2), "Invented [7], real [2], zero [0].")] == [2]


def test_list_forms_and_full_width_brackets_are_citations_years_are_not():
    assert cited_ranks("as shown [1, 3] and [2,4]; 배터리 수명［5］ and 【x】 in [2026] or [a]") == [1, 3, 2, 4, 5]


def test_a_summary_without_markers_cites_nothing():
    assert cited_results(event(), "No citation here.") == []
