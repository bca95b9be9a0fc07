"""A corpus of realistic raw LLM answers to the axis and grid prompts, with what each must parse to.

Each case: (case id, raw answer (text, or decoded JSON as a file would hold it), expected). Expected
keys: kind; n (number of valid points); dropped (num_dropped); clamped (num_clamped); centers and
weights (of the valid points, in order); grid (n x n list).
"""

POINTS_3 = """[
  {"center": [0.25, 0.40], "weight": 1.8, "reasoning": "Transamerica Pyramid spire above the roofline"},
  {"center": [0.70, 0.55], "weight": 1.2, "reasoning": "Victorian bay windows, moderately distinctive"},
  {"center": [0.50, 0.90], "weight": 0.1, "reasoning": "floodwater with reflections"}
]"""
P3_CENTERS = [[0.25, 0.40], [0.70, 0.55], [0.50, 0.90]]
P3_WEIGHTS = [1.8, 1.2, 0.1]

CASES = [
    # --- plain point lists ------------------------------------------------------------------
    ("plain_list", POINTS_3, {"kind": "points", "n": 3, "dropped": 0, "centers": P3_CENTERS, "weights": P3_WEIGHTS}),
    (
        "fenced_json",
        "```json\n" + POINTS_3 + "\n```",
        {"kind": "points", "n": 3, "dropped": 0, "centers": P3_CENTERS, "weights": P3_WEIGHTS},
    ),
    (
        "fenced_no_language",
        "```\n" + POINTS_3 + "\n```\n",
        {"kind": "points", "n": 3, "centers": P3_CENTERS},
    ),
    (
        "prose_around",
        "This is a complex scene with several regions of interest.\n\n"
        + POINTS_3
        + "\n\nThe pyramid is the most distinctive element; the water is not localizable.",
        {"kind": "points", "n": 3, "centers": P3_CENTERS, "weights": P3_WEIGHTS},
    ),
    (
        "prose_and_fence_step_one",
        "Step 1: The image shows a complex street scene, not a single landmark.\n"
        "Step 2: Here are the regions:\n```json\n" + POINTS_3 + "\n```",
        {"kind": "points", "n": 3, "centers": P3_CENTERS},
    ),
    (
        "trailing_commas",
        '[{"center": [0.1, 0.2], "weight": 1.7, "reasoning": "clock tower",},'
        ' {"center": [0.8, 0.3], "weight": 0.5, "reasoning": "generic apartment block",},]',
        {"kind": "points", "n": 2, "dropped": 0, "centers": [[0.1, 0.2], [0.8, 0.3]], "weights": [1.7, 0.5]},
    ),
    (
        "single_quotes",
        "[{'center': [0.3, 0.6], 'weight': 1.6, 'reasoning': 'cable car tracks'},"
        " {'center': [0.9, 0.1], 'weight': 0.0, 'reasoning': 'sky'}]",
        {"kind": "points", "n": 2, "centers": [[0.3, 0.6], [0.9, 0.1]], "weights": [1.6, 0.0]},
    ),
    (
        "python_literals_tuples",
        "[{'center': (0.4, 0.5), 'weight': 1.0, 'reasoning': \"St. Mary's church\", 'unique': True},"
        " {'center': (0.6, 0.2), 'weight': 0.3, 'reasoning': None}]",
        {"kind": "points", "n": 2, "centers": [[0.4, 0.5], [0.6, 0.2]], "weights": [1.0, 0.3]},
    ),
    (
        "json_true_false_single_quotes",
        "[{'center': [0.2, 0.2], 'weight': 1.9, 'reasoning': 'bridge tower', 'visible': true, 'note': null}]",
        {"kind": "points", "n": 1, "centers": [[0.2, 0.2]], "weights": [1.9]},
    ),
    (
        "apostrophe_in_prose",
        "Here's what I found - it's a complex scene:\n" + POINTS_3,
        {"kind": "points", "n": 3, "centers": P3_CENTERS},
    ),
    (
        "numbers_as_strings",
        '[{"center": ["0.5", "0.5"], "weight": "1.5", "reasoning": "mural"}]',
        {"kind": "points", "n": 1, "centers": [[0.5, 0.5]], "weights": [1.5]},
    ),
    (
        "center_as_xy_dict",
        '[{"center": {"x": 0.15, "y": 0.85}, "weight": 0.2, "reasoning": "pavement"}]',
        {"kind": "points", "n": 1, "centers": [[0.15, 0.85]], "weights": [0.2]},
    ),
    (
        "triples",
        "[[0.1, 0.2, 1.8], [0.5, 0.5, 0.4]]",
        {"kind": "points", "n": 2, "centers": [[0.1, 0.2], [0.5, 0.5]], "weights": [1.8, 0.4]},
    ),
    (
        "objects_without_list",
        '{"center": [0.3, 0.3], "weight": 1.7, "reasoning": "dome"},\n'
        '{"center": [0.7, 0.6], "weight": 0.2, "reasoning": "car"}',
        {"kind": "points", "n": 2, "centers": [[0.3, 0.3], [0.7, 0.6]], "weights": [1.7, 0.2]},
    ),
    (
        "single_point_object",
        '{"center": [0.45, 0.35], "weight": 1.6, "reasoning": "Coit Tower"}',
        {"kind": "points", "n": 1, "centers": [[0.45, 0.35]], "weights": [1.6]},
    ),
    (
        "missing_reasoning_kept",
        '[{"center": [0.5, 0.4], "weight": 1.1}]',
        {"kind": "points", "n": 1, "centers": [[0.5, 0.4]], "weights": [1.1]},
    ),
    # --- wrappers ---------------------------------------------------------------------------
    ("result_wrapper_text", '{"result": ' + POINTS_3 + "}", {"kind": "points", "n": 3, "centers": P3_CENTERS}),
    ("regions_wrapper", '{"regions": ' + POINTS_3 + "}", {"kind": "points", "n": 3, "weights": P3_WEIGHTS}),
    ("result_wrapper_none", '{"result": null}', {"kind": "none"}),
    ("result_wrapper_string_none", '{"result": "None"}', {"kind": "none"}),
    # --- out of range, malformed entries, too many points -----------------------------------
    (
        "out_of_range_clamped",
        '[{"center": [-0.1, 1.3], "weight": 2.7, "reasoning": "a"},'
        ' {"center": [0.5, 0.5], "weight": -1, "reasoning": "b"}]',
        {"kind": "points", "n": 2, "clamped": 4, "centers": [[0.0, 1.0], [0.5, 0.5]], "weights": [2.0, 0.0]},
    ),
    (
        "malformed_entries_dropped",
        '[{"center": [0.2, 0.2], "weight": 1.5, "reasoning": "ok"},'
        ' {"center": [0.3], "weight": 1.0, "reasoning": "one coordinate"},'
        ' {"center": [0.3, 0.4], "reasoning": "no weight"},'
        ' {"weight": 1.2, "reasoning": "no center"},'
        ' {"center": ["left", "top"], "weight": 1.0, "reasoning": "words"},'
        ' "just a string", 42, null,'
        ' {"center": [0.9, 0.9], "weight": "high", "reasoning": "word weight"},'
        ' {"center": [0.6, 0.7], "weight": 0.8, "reasoning": "ok too"}]',
        {"kind": "points", "n": 2, "dropped": 8, "centers": [[0.2, 0.2], [0.6, 0.7]], "weights": [1.5, 0.8]},
    ),
    (
        "nan_and_inf_dropped",
        '[{"center": [NaN, 0.5], "weight": 1.0}, {"center": [0.5, 0.5], "weight": Infinity},'
        ' {"center": [0.1, 0.9], "weight": 0.6}]',
        {"kind": "points", "n": 1, "dropped": 2, "centers": [[0.1, 0.9]], "weights": [0.6]},
    ),
    (
        "ten_points_keep_first_eight",
        "["
        + ", ".join(
            f'{{"center": [{i / 10:.1f}, 0.5], "weight": {1 + i / 10:.1f}, "reasoning": "r{i}"}}' for i in range(10)
        )
        + "]",
        {
            "kind": "points",
            "n": 8,
            "dropped": 2,
            "centers": [[i / 10, 0.5] for i in range(8)],
            "weights": [1 + i / 10 for i in range(8)],
        },
    ),
    ("empty_list", "[]", {"kind": "invalid"}),
    ("empty_list_fenced", "```json\n[]\n```", {"kind": "invalid"}),
    ("all_entries_malformed", '[{"centre_point": 1}, {"foo": "bar"}]', {"kind": "invalid", "dropped": 2}),
    # --- None in its spellings --------------------------------------------------------------
    ("none_plain", "None", {"kind": "none"}),
    ("none_lower", "none", {"kind": "none"}),
    ("none_upper_period", "NONE.", {"kind": "none"}),
    ("none_backticks", "`None`", {"kind": "none"}),
    ("none_double_quoted", '"None"', {"kind": "none"}),
    ("none_single_quoted", "'None'", {"kind": "none"}),
    ("none_whitespace", "  \n None \n", {"kind": "none"}),
    ("none_fenced", "```\nNone\n```", {"kind": "none"}),
    ("none_json_null", "null", {"kind": "none"}),
    (
        "none_after_reasoning",
        "The image is dominated by a single landmark (the Golden Gate Bridge).\nNone",
        {"kind": "none"},
    ),
    ("none_decoded", None, {"kind": "none"}),
    ("none_markdown_bold", "**None**", {"kind": "none"}),
    ("none_then_explanation", "None. The Golden Gate Bridge fills the whole frame.", {"kind": "none"}),
    ("none_of_prose_is_invalid", "None of the regions in this image are distinctive.", {"kind": "invalid"}),
    # --- grids ------------------------------------------------------------------------------
    (
        "grid_4x4",
        '{"A1": 0.1, "A2": 0.1, "A3": 0.2, "A4": 0.1, "B1": 1.8, "B2": 1.2, "B3": 1.0, "B4": 0.5,'
        ' "C1": 0.5, "C2": 1.9, "C3": 0.4, "C4": 0.3, "D1": 0.0, "D2": 0.1, "D3": 0.1, "D4": 0.0}',
        {
            "kind": "grid",
            "grid": [
                [0.1, 0.1, 0.2, 0.1],
                [1.8, 1.2, 1.0, 0.5],
                [0.5, 1.9, 0.4, 0.3],
                [0.0, 0.1, 0.1, 0.0],
            ],
        },
    ),
    (
        "grid_3x3_fenced",
        '```json\n{"A1": 0.2, "A2": 0.3, "A3": 0.2, "B1": 1.7, "B2": 1.0, "B3": 1.4,'
        ' "C1": 0.1, "C2": 0.1, "C3": 0.1}\n```',
        {"kind": "grid", "grid": [[0.2, 0.3, 0.2], [1.7, 1.0, 1.4], [0.1, 0.1, 0.1]]},
    ),
    (
        "grid_3x3_partial_n_from_labels",
        '{"A1": 0.5, "C3": 1.5}',
        {"kind": "grid", "grid": [[0.5, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.5]]},
    ),
    (
        "grid_lowercase_out_of_range_and_junk",
        "{'a1': 3.0, 'a2': -0.5, 'b1': 'high', 'b2': 1.0, 'comment': 'sky at the top'}",
        {"kind": "grid", "dropped": 2, "clamped": 2, "grid": [[2.0, 0.0], [1.0, 1.0]]},
    ),
    (
        "grid_in_list",
        '[{"A1": 1.2, "A2": 0.8, "B1": 0.3, "B2": 1.9}]',
        {"kind": "grid", "grid": [[1.2, 0.8], [0.3, 1.9]]},
    ),
    # --- garbage ----------------------------------------------------------------------------
    ("garbage_prose", "I'm sorry, I can't help with identifying locations in this image.", {"kind": "invalid"}),
    ("empty_string", "", {"kind": "invalid"}),
    ("truncated_json", '[{"center": [0.2, 0.3], "weight": 1.8, "reasoning": "tow', {"kind": "invalid"}),
    ("a_number", "42", {"kind": "invalid"}),
    ("unrelated_object", '{"city": "San Francisco", "confidence": 0.9}', {"kind": "invalid"}),
    ("html_error_page", "<html><body><h1>502 Bad Gateway</h1></body></html>", {"kind": "invalid"}),
    ("deep_nesting", "[" * 5000 + "]" * 5000, {"kind": "invalid"}),
]

# The published code's per-image files (decoded), as its annotation step writes them.
PUBLISHED_FILES = [
    (
        "published_points",
        {
            "image_path": "C:/VPR_temp/sf_flood/37.7793_-122.4193@flood.jpg",
            "model": "gemini-2.5-flash",
            "json_format_verified": True,
            "json_content_verified": True,
            "no_weighting": False,
            "result": [
                {"center": [0.25, 0.4], "weight": 1.8, "reasoning": "Transamerica Pyramid spire above the roofline"},
                {"center": [0.7, 0.55], "weight": 1.2, "reasoning": "Victorian bay windows, moderately distinctive"},
                {"center": [0.5, 0.9], "weight": 0.1, "reasoning": "floodwater with reflections"},
            ],
        },
        {"kind": "points", "n": 3, "centers": P3_CENTERS, "weights": P3_WEIGHTS},
    ),
    (
        "published_no_weighting",
        {
            "image_path": "q.jpg",
            "model": "gemini-2.5-flash",
            "json_format_verified": True,
            "json_content_verified": True,
            "no_weighting": True,
            "result": None,
        },
        {"kind": "none"},
    ),
    (
        "published_grid",
        {
            "image_path": "q.jpg",
            "model": "gemini-2.0-flash",
            "json_format_verified": True,
            "json_content_verified": True,
            "no_weighting": False,
            "result": {
                "A1": 0.1,
                "A2": 0.2,
                "A3": 0.3,
                "B1": 1.0,
                "B2": 1.5,
                "B3": 2.0,
                "C1": 0.0,
                "C2": 0.5,
                "C3": 1.0,
            },
        },
        {"kind": "grid", "grid": [[0.1, 0.2, 0.3], [1.0, 1.5, 2.0], [0.0, 0.5, 1.0]]},
    ),
    (
        "published_unverified_raw_text_recoverable",
        {
            "image_path": "q.jpg",
            "model": "qwen3-vl-8b",
            "json_format_verified": False,
            "json_content_verified": False,
            "no_weighting": False,
            "result": "Sure! Here you go:\n```json\n" + POINTS_3 + "\n```",
        },
        {"kind": "points", "n": 3, "centers": P3_CENTERS},
    ),
    (
        "published_unverified_garbage",
        {
            "image_path": "q.jpg",
            "model": "qwen3-vl-8b",
            "json_format_verified": False,
            "json_content_verified": False,
            "no_weighting": False,
            "result": "I cannot determine the regions.",
        },
        {"kind": "invalid"},
    ),
]
