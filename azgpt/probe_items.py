"""Built-in Azerbaijani probe items for `azgpt eval --probes`.

Each item: (group, prompt, candidates, answer_index). The model scores
prompt + candidate for every candidate; the item is right when the candidate
at answer_index has the highest total log-likelihood.
"""

from __future__ import annotations

PROBES: list[tuple[str, str, tuple[str, ...], int]] = [
    # ------------------------------------------------------------------
    # capital: capitals of countries and regions
    # ------------------------------------------------------------------
    ("capital", "Azərbaycanın paytaxtı", (" Bakıdır.", " Gəncədir.", " Şəkidir."), 0),
    ("capital", "Türkiyənin paytaxtı", (" İstanbuldur.", " Ankaradır.", " İzmirdir."), 1),
    ("capital", "Gürcüstanın paytaxtı", (" Batumidir.", " Kutaisidir.", " Tbilisidir."), 2),
    ("capital", "Rusiyanın paytaxtı", (" Kazandır.", " Moskvadır.", " Novosibirskdir."), 1),
    ("capital", "İranın paytaxtı", (" Təbrizdir.", " İsfahandır.", " Tehrandır."), 2),
    ("capital", "Fransanın paytaxtı", (" Parisdir.", " Marseldir.", " Liondur."), 0),
    (
        "capital",
        "Naxçıvan Muxtar Respublikasının paytaxtı",
        (" Ordubaddır.", " Naxçıvan şəhəridir.", " Culfadır."),
        1,
    ),
    ("capital", "Almaniyanın paytaxtı", (" Hamburqdur.", " Frankfurtdur.", " Berlindir."), 2),
    ("capital", "Yaponiyanın paytaxtı", (" Tokiodur.", " Osakadır.", " Kiotodur."), 0),
    ("capital", "İtaliyanın paytaxtı", (" Milandır.", " Romadır.", " Neapoldur."), 1),
    ("capital", "Misirin paytaxtı", (" İsgəndəriyyədir.", " Qahirədir."), 1),
    ("capital", "Böyük Britaniyanın paytaxtı", (" Londondur.", " Mançesterdir."), 0),
    ("capital", "Çinin paytaxtı", (" Şanxaydır.", " Pekindir."), 1),
    # ------------------------------------------------------------------
    # currency: national currencies
    # ------------------------------------------------------------------
    ("currency", "Azərbaycanın milli valyutası", (" rubldur.", " manatdır.", " lirədir."), 1),
    ("currency", "Türkiyənin milli valyutası", (" Türk lirəsidir.", " manatdır.", " avrodur."), 0),
    ("currency", "Rusiyanın milli valyutası", (" dollardır.", " lirədir.", " rubldur."), 2),
    (
        "currency",
        "Amerika Birləşmiş Ştatlarının milli valyutası",
        (" avrodur.", " dollardır.", " funtdur."),
        1,
    ),
    (
        "currency",
        "Fransa, Almaniya və İtaliyada istifadə olunan pul vahidi",
        (" avrodur.", " rubldur.", " manatdır."),
        0,
    ),
    ("currency", "Yaponiyanın pul vahidi", (" yuandır.", " vondur.", " yendir."), 2),
    (
        "currency",
        "Böyük Britaniyanın pul vahidi",
        (" dollardır.", " funt sterlinqdir.", " frankdır."),
        1,
    ),
    ("currency", "Gürcüstanın milli valyutası", (" laridir.", " manatdır.", " rubldur."), 0),
    ("currency", "Çinin milli valyutası", (" yendir.", " yuandır.", " rupidir."), 1),
    ("currency", "İranın milli valyutası", (" lirədir.", " avrodur.", " riyaldır."), 2),
    ("currency", "Bir manat", (" on qəpikdir.", " yüz qəpikdir.", " min qəpikdir."), 1),
    # ------------------------------------------------------------------
    # rivers: rivers, seas and geography
    # ------------------------------------------------------------------
    ("rivers", "Azərbaycanın ən uzun çayı", (" Kürdür.", " Samurdur.", " Qanıxdır."), 0),
    (
        "rivers",
        "Kür çayı",
        (" Qara dənizə tökülür.", " Xəzər dənizinə tökülür.", " Aralıq dənizinə tökülür."),
        1,
    ),
    (
        "rivers",
        "Araz çayı Sabirabad yaxınlığında",
        (" Volqaya qovuşur.", " Nilə qovuşur.", " Kürə qovuşur."),
        2,
    ),
    (
        "rivers",
        "Volqa çayı",
        (" Xəzər dənizinə tökülür.", " Qara dənizə tökülür.", " Ağ dənizə tökülür."),
        0,
    ),
    (
        "rivers",
        "Nil çayı",
        (" Xəzər dənizinə tökülür.", " Baltik dənizinə tökülür.", " Aralıq dənizinə tökülür."),
        2,
    ),
    ("rivers", "Nil çayı", (" Avropada axır.", " Afrikada axır.", " Avstraliyada axır."), 1),
    ("rivers", "Avropanın ən uzun çayı", (" Dunaydır.", " Volqadır.", " Reyndir."), 1),
    (
        "rivers",
        "Bakı şəhəri",
        (
            " Xəzər dənizinin sahilində yerləşir.",
            " Qara dənizin sahilində yerləşir.",
            " Aralıq dənizinin sahilində yerləşir.",
        ),
        0,
    ),
    ("rivers", "Dünyanın ən böyük gölü", (" Göygöldür.", " Xəzər dənizidir.", " Ağ dənizdir."), 1),
    (
        "rivers",
        "Azərbaycanın ən hündür zirvəsi",
        (" Şahdağdır.", " Tufandağdır.", " Bazardüzüdür."),
        2,
    ),
    (
        "rivers",
        "Mingəçevir su anbarı",
        (" Araz çayı üzərində yaradılıb.", " Kür çayı üzərində yaradılıb."),
        1,
    ),
    (
        "rivers",
        "Samur çayı Azərbaycanı",
        (" Rusiyadan ayırır.", " Türkiyədən ayırır.", " Misirdən ayırır."),
        0,
    ),
    # ------------------------------------------------------------------
    # sequence: numbers, months, weekdays, seasons
    # ------------------------------------------------------------------
    ("sequence", "bir, iki, üç,", (" beş", " dörd", " yeddi"), 1),
    ("sequence", "beş, altı, yeddi,", (" doqquz", " on", " səkkiz"), 2),
    ("sequence", "on, iyirmi, otuz,", (" qırx", " əlli", " altmış"), 0),
    ("sequence", "birinci, ikinci,", (" dördüncü", " üçüncü", " beşinci"), 1),
    ("sequence", "yanvar, fevral,", (" aprel", " mart", " may"), 1),
    ("sequence", "mart, aprel,", (" may", " iyun", " iyul"), 0),
    ("sequence", "sentyabr, oktyabr,", (" avqust", " dekabr", " noyabr"), 2),
    ("sequence", "bazar ertəsi, çərşənbə axşamı,", (" cümə", " çərşənbə", " şənbə"), 1),
    ("sequence", "çərşənbə, cümə axşamı,", (" cümə", " bazar", " şənbə"), 0),
    ("sequence", "cümə, şənbə,", (" çərşənbə", " cümə axşamı", " bazar"), 2),
    ("sequence", "qış, yaz, yay,", (" payız", " qış", " yaz"), 0),
    # ------------------------------------------------------------------
    # vowel_harmony: only the suffix vowel differs
    # ------------------------------------------------------------------
    ("vowel_harmony", "Mən hazırda", (" Bakıda yaşayıram.", " Bakıdə yaşayıram."), 0),
    ("vowel_harmony", "Anam indi", (" evda oturur.", " evdə oturur."), 1),
    ("vowel_harmony", "Şkafda çoxlu", (" kitablər var.", " kitablar var."), 1),
    ("vowel_harmony", "Uşağın iri", (" gözlər", " gözlar"), 0),
    ("vowel_harmony", "Uşaqlar", (" məktəbda oxuyur.", " məktəbdə oxuyur."), 1),
    ("vowel_harmony", "Biz dünən", (" parkda gəzdik.", " parkdə gəzdik."), 0),
    ("vowel_harmony", "Dostum", (" Gəncədan gəlib.", " Gəncədən gəlib."), 1),
    ("vowel_harmony", "Mən", (" kitabı oxudum.", " kitabi oxudum."), 0),
    ("vowel_harmony", "Biz sabah", (" Şəkiya gedəcəyik.", " Şəkiyə gedəcəyik."), 1),
    ("vowel_harmony", "Onlar", (" dənizdə üzürlər.", " dənizda üzürlər."), 0),
    ("vowel_harmony", "Qatar", (" Bakıdən yola düşdü.", " Bakıdan yola düşdü."), 1),
    # ------------------------------------------------------------------
    # plural: -lar / -lər
    # ------------------------------------------------------------------
    ("plural", "Həyətdə", (" uşaqlar oynayır.", " uşaqlər oynayır."), 0),
    ("plural", "Məktəbdə bütün", (" müəllimlar toplaşdı.", " müəllimlər toplaşdı."), 1),
    ("plural", "Bağda", (" ağaclər çiçək açıb.", " ağaclar çiçək açıb."), 1),
    ("plural", "Göydə", (" quşlar uçur.", " quşlər uçur."), 0),
    ("plural", "Dükanda təzə", (" meyvəlar satılır.", " meyvələr satılır."), 1),
    ("plural", "Bu kənddə", (" evlər kiçikdir.", " evlar kiçikdir."), 0),
    ("plural", "Auditoriyada", (" tələbəlar oturub.", " tələbələr oturub."), 1),
    ("plural", "Səbətdə", (" almalar var.", " almalər var."), 0),
    ("plural", "Yolda", (" maşınlər dayanıb.", " maşınlar dayanıb."), 1),
    ("plural", "Mənim", (" dostlarım gəldi.", " dostlərim gəldi."), 0),
    ("plural", "Çayın sahilində", (" gəmilar dayanıb.", " gəmilər dayanıb."), 1),
    # ------------------------------------------------------------------
    # dotless_i: ı vs i (and İ vs I)
    # ------------------------------------------------------------------
    ("dotless_i", "Məktəbdə oğlanlar və", (" qizlar", " qızlar"), 1),
    ("dotless_i", "Çörəyi", (" bıçaqla kəsdim.", " biçaqla kəsdim."), 0),
    ("dotless_i", "Türkiyənin ən böyük şəhəri", (" Istanbuldur.", " İstanbuldur."), 1),
    ("dotless_i", "Mənim dostumun adı", (" İlhamdır.", " Ilhamdır."), 0),
    ("dotless_i", "Meşədə böyük bir", (" ayi gördük.", " ayı gördük."), 1),
    ("dotless_i", "Yayda hava", (" isti olur.", " ıstı olur."), 0),
    ("dotless_i", "Otağın", (" qapisini bağladım.", " qapısını bağladım."), 1),
    ("dotless_i", "Bu gün hava", (" yağışlıdır.", " yağişlidir."), 0),
    ("dotless_i", "Onun", (" qardaşi həkimdir.", " qardaşı həkimdir."), 1),
    ("dotless_i", "Sabah", (" İsmayıl gələcək.", " Ismayıl gələcək."), 0),
    ("dotless_i", "Payızda yarpaqlar", (" sari olur.", " sarı olur."), 1),
    # ------------------------------------------------------------------
    # az_vs_tr: Azerbaijani vs Turkish forms in an Azerbaijani sentence
    # ------------------------------------------------------------------
    ("az_vs_tr", "Bu gün", (" ben evdəyəm.", " mən evdəyəm."), 1),
    ("az_vs_tr", "Mən dostum", (" ilə kinoya getdim.", " ile kinoya getdim."), 0),
    ("az_vs_tr", "Bu kitab", (" çok maraqlıdır.", " çox maraqlıdır."), 1),
    ("az_vs_tr", "O, tələbə", (" deyil.", " değil."), 0),
    ("az_vs_tr", "Salam, dostum,", (" nasılsın?", " necəsən?"), 1),
    ("az_vs_tr", "Kömək etdiyiniz üçün", (" təşəkkür edirəm.", " teşekkür ederim."), 0),
    ("az_vs_tr", "Gələn", (" hafta imtahanımız var.", " həftə imtahanımız var."), 1),
    ("az_vs_tr", "Mən səni", (" sevirəm.", " seviyorum."), 0),
    ("az_vs_tr", "Bizim evimiz", (" büyüktür.", " böyükdür."), 1),
    ("az_vs_tr", "Sabah sizə", (" gələcəyəm.", " geleceğim."), 0),
    ("az_vs_tr", "Hava bu gün çox", (" güzeldir.", " gözəldir."), 1),
    ("az_vs_tr", "Bu sualın cavabını", (" bilmirəm.", " bilmiyorum."), 0),
]
