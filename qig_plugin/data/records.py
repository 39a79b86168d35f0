"""The project's hand-written calibration texts, as plain data.

``PHOTO_PROMPTS`` maps each shipped photograph (loaded by ``qig_plugin.data.calibration``) to (prompt, answer)
pairs in three styles: a caption, a short visual question, a detailed description.
``PASSAGE_TASKS`` pairs a topic of the Python documentation (``pydoc_data.topics``) with a task and a photo:
"continue" asks for the next part of the real text (the answer is that text); "summarize" asks for a summary
(the answer is written here). ``TEXT_ONLY_TOPICS`` are continued without a photo, for text-only models.
Photos and topics listed in ``HELDOUT_PHOTOS`` / ``HELDOUT_TOPICS`` only appear in the held-out split.
"""

PHOTO_PROMPTS: dict[str, tuple[tuple[str, str], ...]] = {
    "astronaut": (
        (
            "Write a short caption for this image.",
            "Official portrait of astronaut Eileen Collins in an orange flight suit.",
        ),
        ("What is the person holding next to her?", "A black and white space helmet."),
        (
            "Describe the image in detail.",
            "A smiling woman with short brown hair poses in an orange pressure suit covered with mission patches. "
            "An American flag hangs on the left, a model of the Space Shuttle stands behind her on the right, and "
            "her helmet rests in the foreground.",
        ),
    ),
    "chelsea": (
        ("Caption this photo.", "Close-up of a tabby cat looking to the side."),
        ("What color are the cat's eyes?", "Green with a yellow tint."),
        (
            "Describe what you see.",
            "The face of a brown tabby cat fills the frame. It has striped fur, large green eyes, a pink nose and "
            "white whiskers, and it is looking slightly to the right against a blurred pale background.",
        ),
    ),
    "coffee": (
        ("Write a caption.", "A cup of coffee on a red saucer."),
        ("Is there a spoon in the picture?", "Yes, a small silver spoon lies on the saucer."),
        (
            "Describe the image in detail.",
            "Seen from above at an angle, a white cup with a red outside holds creamy coffee. It stands on a "
            "matching red saucer with a teaspoon, on a wooden table lit by warm light.",
        ),
    ),
    "coins": (
        ("What does this image show?", "Rows of old coins on a dark background."),
        ("How many rows of coins are there?", "Four rows."),
        (
            "Give a detailed description.",
            "A black-and-white photograph of about two dozen ancient coins laid out in four neat rows on a dark "
            "cloth. The coins differ slightly in size and show worn portraits and inscriptions.",
        ),
    ),
    "rocket": (
        ("Caption this image.", "A rocket on its launch pad at dusk."),
        ("What time of day is it?", "Evening: the sky is deep blue and the lights are on."),
        (
            "Describe the scene.",
            "A white rocket stands upright on a launch pad between tall lattice towers. The sky is dark blue and "
            "bright floodlights shine along the ground at the base of the pad.",
        ),
    ),
    "hubble_deep_field": (
        ("Write a short caption.", "The Hubble Deep Field: thousands of distant galaxies."),
        ("Are these objects stars?", "Mostly not; nearly all of them are distant galaxies."),
        (
            "Describe the image in detail.",
            "A black sky is scattered with hundreds of small points and smudges of light in white, orange, red "
            "and blue. Some are spiral or elliptical galaxies, seen as they were billions of years ago.",
        ),
    ),
    "retina": (
        ("What kind of image is this?", "A photograph of the back of a human eye, the retina."),
        ("Where is the optic disc?", "On the left side, the bright yellowish spot where the vessels meet."),
        (
            "Describe this medical image.",
            "A circular fundus photograph shows an orange-red retina on a black background. Blood vessels branch "
            "out from the bright optic disc on the left, and the darker macula lies near the center.",
        ),
    ),
    "camera": (
        ("Caption this photo.", "A man with a camera on a tripod, in black and white."),
        ("What is the man doing?", "He is looking through a film camera mounted on a tripod."),
        (
            "Describe the image in detail.",
            "A grayscale photograph of a man in a dark coat bending to look through a camera on a tripod. He "
            "stands on a lawn; buildings and a tower are visible far away under a pale sky.",
        ),
    ),
    "moon": (
        ("What does this image show?", "A close-up of the surface of the Moon."),
        ("Is the image in color?", "No, it is grayscale."),
        (
            "Describe the image.",
            "A gray lunar surface with a few small round craters, a bright patch near the top and darker spots "
            "lower down. The soft lighting makes the terrain look smooth.",
        ),
    ),
    "horse": (
        ("Caption this image.", "The black silhouette of a horse."),
        ("Which way is the horse facing?", "To the right."),
        (
            "Describe what you see.",
            "A solid black silhouette of a standing horse on a white background, seen from the side. Its head "
            "is raised, its tail hangs down and all four legs are visible.",
        ),
    ),
    "page": (
        ("What is shown here?", "A page of printed text about image segmentation."),
        ("What is the title on the page?", "Region-based segmentation."),
        (
            "Describe the image in detail.",
            "A grayscale scan of a book page. Under the heading \"Region-based segmentation\" a paragraph explains "
            "how to choose markers for coins and background, and a line of Python code follows below. The "
            "lighting is uneven, darker at the bottom.",
        ),
    ),
    "text": (
        ("What is in this picture?", "Handwritten mathematical symbols on a surface."),
        ("Is the writing printed or handwritten?", "Handwritten."),
        (
            "Describe the image.",
            "A grayscale photo, taken at an angle, of handwritten formulas and symbols drawn in dark ink across "
            "a light surface, with a horizontal line running through part of the writing.",
        ),
    ),
    "brick": (
        ("Caption this image.", "A brick wall seen at an angle."),
        ("What material is shown?", "Bricks laid in a running bond."),
        (
            "Describe the texture.",
            "Long, narrow gray bricks form regular rows separated by lighter mortar joints. The wall recedes "
            "toward the top of the frame, so the rows converge slightly.",
        ),
    ),
    "grass": (
        ("What does this image show?", "A close-up of grass."),
        ("Is the image in color?", "No, it is grayscale."),
        (
            "Describe the texture.",
            "A dense tangle of thin grass blades fills the whole frame, crossing in every direction, with bright "
            "blades in front of darker shadows.",
        ),
    ),
    "gravel": (
        ("Caption this image.", "A surface covered with gravel."),
        ("Are the stones large or small?", "Small, each about the same size."),
        (
            "Describe the texture.",
            "Thousands of small angular stones lie packed together, evenly covering the frame in a grayscale "
            "pattern of light tops and dark gaps.",
        ),
    ),
    "immunohistochemistry": (
        ("What kind of image is this?", "A microscope image of a stained tissue sample."),
        ("What colors dominate the image?", "Brown and pale blue."),
        (
            "Describe the image in detail.",
            "A light micrograph of tissue stained with immunohistochemistry. Brown-stained glandular structures "
            "with curved outlines stand out against pale blue cells and connective tissue.",
        ),
    ),
    "china": (
        ("Write a caption.", "A Chinese pagoda on a hill above a lake."),
        ("How many levels does the building have?", "Several tiers; at least three roofs are visible."),
        (
            "Describe the scene.",
            "A tall multi-tiered temple with red walls and green-tiled roofs rises among trees on a hillside. "
            "Behind it a wide lake stretches to the horizon under a hazy sky.",
        ),
    ),
    "flower": (
        ("Caption this photo.", "An orange dahlia in bloom."),
        ("What color is the flower?", "Orange, with lighter peach tips."),
        (
            "Describe the image.",
            "A round orange dahlia with many tightly packed petals is in sharp focus against a blurred dark "
            "green and blue background. Part of a second flower shows at the bottom.",
        ),
    ),
    "grace_hopper": (
        ("Caption this portrait.", "Portrait of Rear Admiral Grace Hopper in navy uniform."),
        ("Is the person wearing glasses?", "Yes."),
        (
            "Describe the image in detail.",
            "An elderly woman with glasses and a navy officer's cap looks at the camera. She wears a dark "
            "uniform with rows of ribbons and a name tag, with an American flag behind her.",
        ),
    ),
}

HELDOUT_PHOTOS = frozenset({"chelsea", "rocket", "moon", "gravel", "flower"})

# (topic, task, photo shown with the passage, summary for "summarize" tasks or None)
PASSAGE_TASKS: tuple[tuple[str, str, str, str | None], ...] = (
    (
        "while",
        "summarize",
        "coffee",
        "The while statement runs its body again and again as long as its condition is true. When the "
        "condition becomes false, the optional else clause runs; a break leaves the loop without running the "
        "else clause, and continue jumps back to the test.",
    ),
    (
        "if",
        "summarize",
        "camera",
        "The if statement runs the suite of the first condition that is true among the if and elif clauses; "
        "if none is true, the else clause runs, if there is one.",
    ),
    (
        "pass",
        "summarize",
        "brick",
        "pass does nothing. It is a placeholder where the syntax needs a statement but no code has to run, "
        "such as an empty function or class body.",
    ),
    (
        "break",
        "summarize",
        "coins",
        "break can only appear inside a for or while loop. It ends the nearest enclosing loop at once, skips "
        "the loop's else clause, and still runs the finally clause of a try statement it leaves.",
    ),
    ("for", "continue", "astronaut", None),
    ("with", "continue", "page", None),
    ("exceptions", "continue", "hubble_deep_field", None),
    ("naming", "continue", "china", None),
    ("function", "continue", "retina", None),
    ("class", "continue", "horse", None),
    (
        "continue",
        "summarize",
        "flower",
        "continue can only appear inside a for or while loop. It skips the rest of the current iteration and "
        "goes on with the next cycle of the nearest enclosing loop.",
    ),
    ("truth", "continue", "moon", None),
    ("try", "continue", "rocket", None),
    ("dict", "continue", "chelsea", None),
)

# Topics whose passages only the text-only records continue (for text-only LLMs, which take no photo)
TEXT_ONLY_TOPICS: tuple[str, ...] = (
    "assert", "assignment", "augassign", "calls", "comparisons", "context-managers", "del", "global",
    "import", "lambda", "raise", "return", "slicings", "strings",
    "booleans", "nonlocal", "yield", "lists",
)

HELDOUT_TOPICS = frozenset({"continue", "truth", "try", "dict", "booleans", "nonlocal", "yield", "lists"})
