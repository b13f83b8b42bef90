from app.config import HeuristicsConfig
from app.refine.heuristics import RULES, failing_rules, signals

PROSE = ("The quick brown fox jumps over the lazy dog and then it runs to the river with the others. "
         "It is said that the fox has been seen near the old mill, where the farmers gather every morning. "
         "Nobody knows where it goes at night, but the children like to imagine a secret den in the woods. "
         "Some say it is the same fox that was here last year. Others think it is its cub, now grown up. "
         "Either way, the village has grown fond of it and leaves out scraps of food by the gate.")


def test_clean_prose_passes_every_rule():
    s = signals(PROSE)
    assert s["h_words"] > 50 and 3 <= s["h_mean_word_len"] <= 10 and s["h_stop_words"] >= 2
    assert s["h_c4_sentences"] >= 5 and s["h_dup_line_frac"] == 0
    assert failing_rules(s, HeuristicsConfig()) == []


def test_each_rule_fires_on_the_text_it_targets():
    cfg = HeuristicsConfig()
    assert "gopher_min_words" in failing_rules(signals("too short to be a document."), cfg)
    rep = "\n".join(["the same line repeated with the words and that"] * 20)
    r = failing_rules(signals(rep), cfg)
    assert {"gopher_dup_lines", "gopher_dup_line_chars", "gopher_dup_5gram"} <= set(r)
    assert "gopher_top_2gram" in failing_rules(signals(PROSE + " buy now" * 40), cfg)
    bullets = "\n".join(f"- item {i} of the list with the words and to" for i in range(60))
    assert "gopher_bullet_lines" in failing_rules(signals(bullets), cfg)
    hashes = PROSE + " #tag" * 40
    assert "gopher_symbol_ratio" in failing_rules(signals(hashes), cfg)
    assert "c4_lorem_ipsum" in failing_rules(signals(PROSE + " Lorem ipsum dolor sit amet."), cfg)
    assert "c4_curly_bracket" in failing_rules(signals(PROSE + " x = {1: 2}."), cfg)
    assert "gopher_stop_words" in failing_rules(signals(" ".join(["lorem", "dolor", "amet"] * 30)), cfg)
    assert "c4_max_word_length" in failing_rules(signals(PROSE + " " + "a" * 1001), cfg)


def test_null_threshold_switches_a_rule_off():
    s = signals("too short to be a document.")
    assert "gopher_min_words" not in failing_rules(s, HeuristicsConfig(min_words=None))


def test_rule_names_are_unique():
    names = [n for n, _, _ in RULES]
    assert len(names) == len(set(names))
