"""Web-quality rules (azgpt/quality.py) and how `azgpt clean` applies them: a site's hub page
(menu and a list of headlines), a link list and a menu are dropped and counted by rule with
examples, while articles, verse and legal text stay; records with a `url` are judged by default,
any input with `--quality all`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from azgpt.cli import main
from azgpt.quality import DEFAULT, RULES, Thresholds, failures, statistics, verdict

MENU = ["Ana səhifə", "Xəbərlər", "Siyasət", "İqtisadiyyat", "İdman", "Mədəniyyət", "Əlaqə"]
HEADLINES = [
    "Prezident Bakıda yeni məktəbin açılışında iştirak edib",
    "Xəzər dənizində güclü külək gözlənilir",
    "Gəncədə kitab sərgisi keçiriləcək",
    "Milli komanda növbəti oyuna hazırlaşır",
    "Neftin qiyməti yenidən bahalaşıb",
    "Şəkidə turistlərin sayı artıb",
    "Sumqayıtda yeni park salınır",
    "Universitetlərə qəbul imtahanları başlayır",
    "Lənkəranda çay yığımı mövsümü açılıb",
    "Qubada alma festivalı keçiriləcək",
]
HUB = "\n".join(MENU + HEADLINES + ["Bütün xəbərlər", "© 2026 Xəbər portalı"])
LINK_LIST = "\n".join(f"{h} - Ətraflı" for h in HEADLINES)
ARTICLE = (
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin qərb sahilində, "
    "Abşeron yarımadasının cənub hissəsində yerləşir.\n"
    "İçərişəhər qədim divarları, Qız qalası və Şirvanşahlar sarayı ilə tanınır. Bu abidələr "
    "UNESCO-nun Ümumdünya irsi siyahısına daxil edilmişdir.\n"
    "Şəhərin iqlimi mülayim isti və qurudur, burada tez-tez güclü xəzri küləyi əsir. Bakı həm də "
    "neft sənayesinin qədim mərkəzlərindən biridir."
)
# Verse of eight-syllable lines (22-30 characters) with a refrain: FineWeb's 30-character
# short-line bound and Gopher's duplicate-line bounds would drop it.
POEM = "\n".join(
    [
        "Qış getdi, yenə bahar gəldi,",
        "Gül bitdi və laləzar gəldi.",
        "Quşlar qamusu fəğanə düşdü,",
        "Eşq odu yenə bu canə düşdü.",
        "Yüz min cəfa qılsan mənə,",
        "Mən səndən üz döndərmənəm.",
        "Canım ola qurban sənə,",
        "Mən səndən üz döndərmənəm.",
        "Bağlarda açıldı qönçə güllər,",
        "Oxudu səhər çağı bülbüllər.",
    ]
)
LEGAL = (
    "Maddə 12. Vergi ödəyicisinin hüquqları\n"
    "12.1. Vergi ödəyicisinin aşağıdakı hüquqları vardır:\n"
    "12.1.1. vergi orqanlarından qüvvədə olan vergilər haqqında məlumat almaq;\n"
    "12.1.2. vergi orqanlarına izahat vermək;\n"
    "12.1.3. vergi yoxlamasının nəticələri ilə tanış olmaq;\n"
    "12.1.4. vergi orqanlarının qərarlarından şikayət vermək."
)


def test_hub_page_menu_and_link_list_fail_prose_passes():
    assert verdict(HUB)[0] is not None
    assert verdict(LINK_LIST)[0] is not None
    assert verdict("\n".join(MENU * 4))[0] is not None
    for text in (ARTICLE, POEM, LEGAL):
        assert verdict(text) == (None, statistics(text)), text[:40]


def _prose_lines(n: int) -> list[str]:
    return [f"Bu {i}-ci cümlə Azərbaycan dilində yazılmış adi bir cümlədir." for i in range(n)]


# One document per rule that the rule drops.
FAILS_ONE_RULE = {
    "too_few_words": "Bakı gözəl şəhərdir.",
    "mean_word_length": " ".join(["ab"] * 40) + ".",
    "symbol_ratio": "\n".join(line + " #xəbər #bakı." for line in _prose_lines(4)),
    "bullet_lines": "\n".join("• " + line for line in _prose_lines(5)),
    "ellipsis_lines": "\n".join(line[:-1] + "..." for line in _prose_lines(5)),
    "non_alpha_words": "Cədvəl: " + " ".join(str(1000 + i) for i in range(30)) + ".",
    "lines_without_punctuation": "\n".join(HEADLINES),
    "short_lines": "\n".join(["Bəli, belədir."] * 1 + [f"Sətir {i}." for i in range(9)])
    + "\n"
    + " ".join(["söz"] * 30)
    + ".",
    "duplicate_lines": "\n".join(_prose_lines(2) + ["Abunə olun və bölüşün, dostlar!"] * 5),
    "newline_ratio": "\n".join(f"{w} {w}." for w in "abcdefghijklmnopqrstuvwxyz"),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_fires_on_its_own_case(rule):
    s = statistics(FAILS_ONE_RULE[rule])
    assert rule in failures(s), (rule, s)


def test_thresholds_are_the_defaults_the_rules_use():
    loose = Thresholds(min_words=1)
    assert verdict(FAILS_ONE_RULE["too_few_words"], loose)[0] is None
    assert verdict(FAILS_ONE_RULE["too_few_words"], DEFAULT)[0] == "too_few_words"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def _docs(path: Path) -> list[str]:
    return [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _clean_with_report(src: Path) -> tuple[list[str], dict]:
    """`azgpt clean SRC --report` beside SRC: the documents kept and the report."""
    out, rep = src.with_name("clean.txt"), src.with_name("report.json")
    assert main(["clean", str(src), "--out", str(out), "--report", str(rep)]) == 0
    return _docs(out), json.loads(rep.read_text())


def test_clean_drops_hub_page_of_crawled_records_and_reports_examples(tmp_path, capsys):
    src = _jsonl(
        tmp_path / "pages.jsonl",
        [
            {"url": "https://xeber.az/", "text": HUB},
            {"url": "https://xeber.az/baki", "text": ARTICLE},
            {"url": "https://xeber.az/links", "text": LINK_LIST},
            {"url": "https://seir.az/bahar", "text": POEM},
        ],
    )
    docs, report = _clean_with_report(src)
    assert docs == [ARTICLE, POEM]
    dropped = {k: v for k, v in report["dropped"].items() if k.startswith("quality:")}
    assert sum(dropped.values()) == 2
    assert report["quality"]["applied_to"] == "web"
    assert report["quality"]["thresholds"]["min_words"] == DEFAULT.min_words
    examples = [e for ex in report["quality"]["examples"].values() for e in ex]
    assert any(e.startswith(MENU[0]) for e in examples)
    assert "e.g. " in capsys.readouterr().out


def test_quality_off_keeps_hub_page(tmp_path):
    src = _jsonl(tmp_path / "pages.jsonl", [{"url": "https://xeber.az/", "text": HUB}])
    out = tmp_path / "clean.txt"
    assert main(["clean", str(src), "--out", str(out), "--quality", "off"]) == 0
    assert _docs(out) == [HUB]


def test_text_files_are_judged_only_with_quality_all(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(f"{HUB}\n\n{ARTICLE}\n\n{LEGAL}\n", encoding="utf-8")
    out = tmp_path / "clean.txt"
    assert main(["clean", str(src), "--out", str(out)]) == 0
    assert _docs(out) == [HUB, ARTICLE, LEGAL]
    assert main(["clean", str(src), "--out", str(out), "--quality", "all"]) == 0
    assert _docs(out) == [ARTICLE, LEGAL]


def test_bad_quality_value_is_one_line(tmp_path, capsys):
    src = tmp_path / "corpus.txt"
    src.write_text(ARTICLE + "\n", encoding="utf-8")
    assert main(["clean", str(src), "--out", str(tmp_path / "o.txt"), "--quality", "some"]) == 2
    err = capsys.readouterr().err
    assert "--quality" in err and "Traceback" not in err


# A day's headlines in <p> (no links): about a fifth of the lines end in a quote, a guillemet
# or a question mark, which the last character alone would count as ending a sentence.
HEADLINE_DAY = "\n".join(
    [
        "Günün başlıqları",
        "Prezident yeni fərman imzalayıb",
        "Bakıda güclü külək gözlənilir",
        "Milli komanda növbəti oyuna hazırlaşır",
        "Neftin qiyməti yenidən bahalaşıb",
        'Nazir: "İslahatlar davam edəcək"',
        "Məktəblərdə yeni tədris ili başlayır?",
        "Gəncədə yeni park istifadəyə verilib",
        "Xəzərdə balıq ovuna qadağa qoyulur",
        "Sumqayıtda yol təmiri başa çatıb",
        "Deputat: «Bu qərar vaxtında verilib»",
        "Metroda qatarların hərəkət qrafiki dəyişir",
        "Şəkidə turist axını artıb",
        "Kənd təsərrüfatına subsidiyalar artırılır",
        "Beynəlxalq sərgi Bakıda açılıb",
        "Qiymətlər niyə artır?",
        "Təhsil naziri müəllimlərlə görüşüb",
        "Lənkəranda çay mövsümü başlayıb",
        "Yeni avtobus marşrutları açılıb",
        "Səhiyyə nazirliyindən xəbərdarlıq",
        "Futbol üzrə çempionatda növbəti tur",
        "Mərkəzi Bankdan yeni qərar",
        "Qəbələdə qar yağıb",
        "Ekspert: «Bazar sabitləşəcək»",
        "Universitetlərdə qəbul planı açıqlanıb",
        "Azərbaycan nümayəndə heyəti Cenevrədə",
        "Xaçmazda meyvə yığımı başlayıb",
        "Tələbələr üçün yeni təqaüd proqramı",
        "Hava haqqında: sabah yağış yağacaq?",
        "Naxçıvanda yeni xəstəxana tikilir",
        "Bakı limanında yük daşımaları artıb",
    ]
)
# Prose whose lines end in closing quotes and guillemets after a full stop, with a question.
DIALOGUE = "\n".join(
    [
        "— Sən hara gedirsən? — deyə qoca yolun kənarında dayanıb soruşdu.",
        "— Şəhərə, bazara gedirəm, — oğlan cavab verdi.",
        "Qoca başını buladı: «Yol uzundur, axşama qədər çatmazsan.»",
        '"Eybi yoxdur," dedi oğlan, "səhər tezdən çıxmışam, tələsirəm."',
        "Onlar bir müddət susdular. Sonra qoca dedi: «Allah amanında olsun.»",
        "Oğlan gülümsədi, «Leyli və Məcnun» kitabını çantasına qoyub yoluna davam etdi.",
    ]
)


def test_headline_lists_ending_in_quotes_question_marks_or_tags_are_dropped():
    lines = HEADLINE_DAY.split("\n")
    tagged = "\n".join(
        [lines[0]] + [f"{h} ({'foto' if i % 2 else 'video'})" for i, h in enumerate(lines[1:])]
    )
    bracketed = "\n".join([lines[0]] + [f"{h.rstrip('?')} [FOTO]" for h in lines[1:]])
    for text in (HEADLINE_DAY, tagged, bracketed):
        assert verdict(text)[0] == "lines_without_punctuation", text[:60]
    for text in (ARTICLE, POEM, LEGAL, DIALOGUE):
        assert verdict(text)[0] is None, text[:40]


def test_clean_drops_a_crawled_headline_list_and_keeps_the_article(tmp_path):
    src = _jsonl(
        tmp_path / "pages.jsonl",
        [
            {"url": "https://xeber.az/bashliqlar", "text": HEADLINE_DAY},
            {"url": "https://xeber.az/baki", "text": ARTICLE},
            {"url": "https://hekaye.az/yol", "text": DIALOGUE},
        ],
    )
    docs, report = _clean_with_report(src)
    assert docs == [ARTICLE, DIALOGUE]
    assert report["dropped"]["quality:lines_without_punctuation"] == 1
