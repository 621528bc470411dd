"""Correct text must come back unchanged: genuine Cyrillic, old spellings and mixed scripts."""

from collections import Counter

import pytest

from azgpt.text import clean_document, fix_lookalikes, repair_mojibake

UNCHANGED = [
    "Гаджиева Сабина bu gün gəldi",  # Russian names next to Azerbaijani
    "Рашид Гусейнов necəsən?",
    '"Русский знаете?" deyə soruşdu',
    "köhnə Славутич televizoru",
    "MƏNİM ДОСТУМ ЕЛЧИН",
    "XALQIN ƏHVÄLI, KÄNDİN İŞİ",  # Ä as an old spelling, not a damaged Ğ
    "Дочь Войны filmi",
    "#yenimebel#мебель",
    "Ramil ПетровVüsal",  # a missing space: the Russian word stays Russian
    "Qiyməti 25 ₼ — «Endirim» 50%!",
    "Café, naïve, Zürich, São Paulo",
]


@pytest.mark.parametrize("line", UNCHANGED)
def test_correct_lines_are_left_alone(line):
    st = Counter()
    assert repair_mojibake(line, st) == line
    assert fix_lookalikes(line, Counter()) == line
    assert "mojibake_residual" not in st


def test_lookalikes_only_inside_mixed_words():
    st = Counter()
    assert fix_lookalikes("mәktәb vә Әli КӘND", st) == "məktəb və Əli KƏND"
    assert st["lookalike_cyrillic"] == 6
    assert fix_lookalikes("Bakı gözəl şəhərdir, ә dedi", Counter()) == "Bakı gözəl şəhərdir, ə dedi"


def test_dropped_byte_repair_needs_evidence_in_the_line():
    bad = "TÉ™lim Ã¼Ã§Ã¼n Æsas Kitabxanalar"  # Ə lost its 0x8F byte, the rest is plain mojibake
    assert clean_document(bad)[0] == "Təlim üçün Əsas Kitabxanalar"
    assert clean_document("Æsas")[0] == "Əsas"  # Æ is never Azerbaijani: always a damaged Ə
    assert repair_mojibake("KÄNDİN", Counter()) == "KÄNDİN"  # alone, Ä is not a damaged Ğ
