"""Duplicate removal in `azgpt clean`: near-duplicates (MinHash LSH) go, distinct documents on the
same topic stay; boilerplate lines repeated across one site's pages go, the same line on a site
where it is rare stays."""

from __future__ import annotations

import json
import random

import pytest
from conftest import read_output_docs

pytest.importorskip("datasketch")

from azgpt.clean import run_clean  # noqa: E402
from azgpt.cli import main  # noqa: E402
from azgpt.dedup import MIN_WORDS, LineFilter, NearDedup, Signer  # noqa: E402

# Three different texts on one topic (Baku): same vocabulary, different sentences.
TOPIC = [
    "Bakı Azərbaycanın paytaxtı və ən böyük şəhəridir. Şəhər Xəzər dənizinin qərb sahilində, "
    "Abşeron yarımadasının cənubunda yerləşir və ölkənin siyasi, iqtisadi və mədəni mərkəzi "
    "sayılır. Bakının tarixi çox qədimdir: İçərişəhər ərazisində yaşayış izləri min illər "
    "əvvələ gedib çıxır. Orta əsrlərdə şəhər Şirvanşahlar dövlətinin mühüm limanı idi, burada "
    "karvansaralar, hamamlar və məscidlər tikilirdi. On doqquzuncu əsrin sonunda neft "
    "hasilatının sürətlə artması Bakını dünyanın ən tanınmış sənaye şəhərlərindən birinə "
    "çevirdi. O dövrdə tikilən möhtəşəm binalar bu gün də şəhərin mərkəzini bəzəyir. "
    "Bu gün Bakı həm qədim abidələri, həm də müasir göydələnləri ilə qonaqları heyran qoyur.",
    "Bakının iqlimi mülayim isti və quru subtropik iqlimdir. Yay ayları isti və günəşli keçir, "
    "qış isə adətən yumşaq olur, qar nadir hallarda yağır. Şəhərin ən məşhur təbii xüsusiyyəti "
    "güclü küləkləridir: şimaldan əsən xəzri və cənubdan əsən gilavar il boyu hiss olunur. "
    "Buna görə Bakıya bəzən küləklər şəhəri deyirlər. Dəniz kənarındakı bulvar sakinlərin və "
    "turistlərin ən çox gəzdiyi yerdir; axşamlar burada sərin dəniz havası insanları bir "
    "araya toplayır. Şəhər ətrafında palçıq vulkanları və yanar dağ kimi nadir təbii "
    "mənzərələr də var, onlara baxmaq üçün hər il minlərlə adam gəlir.",
    "Bakıda ictimai nəqliyyat son illərdə xeyli yenilənib. Metropoliten 1967-ci ildə açılıb və "
    "bu gün şəhərin müxtəlif rayonlarını birləşdirən bir neçə xətdən ibarətdir. Stansiyaların "
    "çoxu mərmər, mozaika və rəsmlərlə bəzədilib, bəziləri muzey kimi görünür. Avtobus "
    "şəbəkəsi də genişdir, yeni avtobuslar kartla ödəniş sistemi ilə işləyir. Şəhərin "
    "mərkəzindən hava limanına birbaşa ekspress avtobus gedir, dəniz vağzalından isə Xəzərin "
    "o biri sahilinə gəmilər yola düşür. Son illərdə velosiped yolları və piyada küçələri də "
    "artıb, sakinlər qısa məsafələri getdikcə daha çox piyada qət edirlər.",
]


def edit_lightly(text: str, seed: int) -> str:
    """A copy as another site would republish it: one word changed, a source line added."""
    words = text.split(" ")
    rng = random.Random(seed)
    i = rng.randrange(10, len(words) - 10)
    words[i] = "həqiqətən"
    return " ".join(words) + "\nMənbə: xəbər portalı."


def test_signatures_of_copies_agree_and_of_topic_neighbours_do_not():
    s = Signer()
    near = NearDedup()
    sigs = [s.sign(t) for t in TOPIC]
    assert all(sig is not None for sig in sigs)
    for a in range(3):
        for b in range(a + 1, 3):
            assert (sigs[a] == sigs[b]).mean() < 0.1  # estimated Jaccard of distinct texts
        copy = s.sign(edit_lightly(TOPIC[a], a))
        assert (sigs[a] == copy).mean() > 0.8
    assert [near.is_duplicate(sig) for sig in sigs] == [False, False, False]
    assert near.is_duplicate(s.sign(edit_lightly(TOPIC[1], 7)))
    assert s.sign(" ".join(["söz"] * (MIN_WORDS - 1))) is None


def test_clean_removes_near_duplicates_keeps_topic_neighbours(tmp_path):
    docs = [TOPIC[0], edit_lightly(TOPIC[0], 1), TOPIC[1], TOPIC[2], edit_lightly(TOPIC[2], 2)]
    docs.append(edit_lightly(TOPIC[1], 3).replace(".", "!"))  # punctuation does not matter
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    out = tmp_path / "out.txt"
    rep = run_clean([str(src)], str(out))
    assert read_output_docs(out) == TOPIC
    assert rep.dropped == {"near_duplicate": 3}
    d = rep.to_dict()
    assert d["near_dedup"]["threshold"] == 0.8 and d["near_dedup"]["bands"] > 1

    kept = run_clean([str(src)], str(tmp_path / "o2.txt"), near_dedup=False)
    assert kept.documents_out == 6 and not kept.dropped
    # A heavily rewritten copy (every eighth word changed) is not a near-duplicate.
    words = TOPIC[0].split(" ")
    heavy = " ".join("yeni" if i % 8 == 4 else w for i, w in enumerate(words))
    src2 = tmp_path / "in2.txt"
    src2.write_text(TOPIC[0] + "\n\n" + heavy + "\n", encoding="utf-8")
    assert run_clean([str(src2)], str(tmp_path / "o3.txt")).documents_out == 2


def test_cli_threshold_and_switch(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(TOPIC[0] + "\n\n" + edit_lightly(TOPIC[0], 5) + "\n", encoding="utf-8")
    out = tmp_path / "o.txt"
    assert main(["clean", str(src), "--out", str(out), "--workers", "1"]) == 0
    assert "near_duplicate=1" in capsys.readouterr().out
    assert main(["clean", str(src), "--out", str(out), "--workers", "1", "--no-near-dedup"]) == 0
    assert len(read_output_docs(out)) == 2
    capsys.readouterr()
    assert main(["clean", str(src), "--out", str(out), "--near-dup-threshold", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--near-dup-threshold" in err and len(err.splitlines()) == 1


def test_two_workers_give_the_same_result(tmp_path):
    docs = [TOPIC[0], edit_lightly(TOPIC[0], 1), TOPIC[1], TOPIC[2], edit_lightly(TOPIC[2], 2)]
    src = tmp_path / "in.txt"
    src.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    rep = run_clean([str(src)], str(tmp_path / "o.txt"), workers=2, batch_docs=2)
    assert read_output_docs(tmp_path / "o.txt") == TOPIC
    assert rep.dropped == {"near_duplicate": 2}


# ----------------------------------------------------------------------------- boilerplate lines

BODIES = [
    "Bakıda yeni park açıldı, sakinlər bayram əhval-ruhiyyəsində idi.",
    "Gəncədə kitab sərgisi keçirildi və çoxlu qonaq gəldi.",
    "Şəkidə ipək festivalı başladı, sənətkarlar öz işlərini göstərdi.",
    "Qubada alma məhsulu bu il xüsusilə bol oldu.",
    "Lənkəranda çay plantasiyalarında məhsul yığımı davam edir.",
    "Naxçıvanda duz mağarasına gələn qonaqların sayı artıb.",
]
MENU = "Ana səhifə"
FOOTER = "Bütün hüquqlar qorunur. Materiallardan istifadə zamanı istinad vacibdir."


def test_boilerplate_lines_of_one_site_removed(tmp_path):
    src = tmp_path / "crawl.jsonl"
    recs = [
        {"url": f"https://www.xeber.az/news/{i}", "text": f"{MENU}\n{body}\n{FOOTER}"}
        for i, body in enumerate(BODIES)
    ]
    # Another site shows the menu line on two pages only: there it is not boilerplate.
    recs += [
        {
            "url": "https://blog.az/1",
            "text": f"{MENU}\nBloqda bu gün yağışlı hava haqqında yazdıq.",
        },
        {
            "url": "https://blog.az/2",
            "text": f"{MENU}\nBloqda sabah dəniz sahilində gəzinti olacaq.",
        },
        {"text": f"{MENU}\nURL-siz sənəddə heç nə silinmir, çünki saytı bilinmir."},
    ]
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n", "utf-8")
    out = tmp_path / "o.txt"
    # One-sentence pages: the web-quality rules (tests/test_quality.py) would drop them.
    rep = run_clean([str(src)], str(out), quality="off")
    got = read_output_docs(out)
    assert got[:6] == BODIES
    assert got[6:] == [recs[6]["text"], recs[7]["text"], recs[8]["text"]]
    assert rep.boilerplate_lines == 12
    assert rep.to_dict()["boilerplate_lines_removed"] == 12
    assert "boilerplate lines removed: 12" in rep.format()
    off = run_clean([str(src)], str(tmp_path / "o2.txt"), line_filter=False, quality="off")
    assert off.boilerplate_lines == 0
    assert read_output_docs(tmp_path / "o2.txt")[0] == recs[0]["text"]


def test_line_filter_share_and_memory_bound():
    lf = LineFilter(min_docs=3, min_share=0.5, max_entries=50)
    for i in range(10):
        lf.observe("a.az", f"menyu\nsətir {i}\n" + ("nadir\n" if i < 4 else ""))
    lf.finish()
    assert lf.apply("a.az", "menyu\nmətn") == ("mətn", 1)  # in 10 of 10 documents
    assert lf.apply("a.az", "nadir\nmətn") == ("nadir\nmətn", 0)  # in 4 of 10: under half
    assert lf.apply("b.az", "menyu\nmətn") == ("menyu\nmətn", 0)
    assert lf.apply(None, "menyu") == ("menyu", 0)
    assert len(lf.counts) <= 50
