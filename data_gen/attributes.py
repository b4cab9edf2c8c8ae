"""The persona vocabulary: visual attributes (shown in images, stated in descriptions) and facts.

Visual attributes are what identify a persona across modalities; facts are never shown or
described and only serve fact and multi-hop questions. Each visual value carries the phrases a
description may use for it (synonyms), so paraphrases vary the words but never the meaning.
"""

from __future__ import annotations

# attribute -> value -> description phrases (the first one is the canonical phrase).
VISUAL_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "age_band": {
        "young adult": ("young", "youthful", "young-looking"),
        "middle-aged": ("middle-aged", "mid-life"),
        "senior": ("elderly", "older", "senior"),
    },
    "gender_presentation": {
        "androgynous": ("person", "individual"),
        "feminine": ("woman", "lady"),
        "masculine": ("man", "gentleman"),
    },
    "skin_tone": {
        "porcelain": ("porcelain", "very pale"),
        "fair": ("fair", "light"),
        "olive": ("olive", "olive-toned"),
        "tan": ("tan", "sun-tanned"),
        "brown": ("brown", "medium-brown"),
        "deep": ("deep brown", "dark"),
    },
    "hair_colour": {
        "black": ("black", "jet-black"),
        "brown": ("brown", "chestnut"),
        "blonde": ("blonde", "golden"),
        "red": ("red", "ginger"),
        "grey": ("grey", "silver"),
        "blue": ("blue", "dyed blue"),
        "green": ("green", "dyed green"),
        "pink": ("pink", "dyed pink"),
    },
    "hair_style": {  # "{c}" takes the hair colour phrase; bald heads show it as eyebrows.
        "buzz cut": ("a {c} buzz cut", "very short cropped {c} hair"),
        "short": ("short {c} hair", "a short {c} haircut"),
        "bald": ("a bald head and {c} eyebrows", "a shaved head and {c} eyebrows"),
        "long": ("long straight {c} hair", "long {c} hair"),
        "curly": ("curly {c} hair", "a mop of {c} curls"),
        "ponytail": ("a {c} ponytail", "{c} hair tied in a ponytail"),
        "bun": ("a {c} hair bun", "{c} hair pulled into a bun"),
        "mohawk": ("a {c} mohawk", "a spiky {c} mohawk"),
    },
    "eye_colour": {
        "brown": ("brown", "dark brown"),
        "blue": ("blue", "bright blue"),
        "green": ("green", "emerald"),
        "hazel": ("hazel", "amber-hazel"),
        "grey": ("grey", "steel-grey"),
    },
    "eyewear": {
        "none": ("no glasses", "no eyewear"),
        "round glasses": ("round glasses", "round spectacles"),
        "square glasses": ("square glasses", "rectangular spectacles"),
        "sunglasses": ("tinted sunglasses", "dark shades"),
    },
    "facial_hair": {
        "none": ("no facial hair", "a clean-shaven face"),
        "beard": ("a full beard", "a thick beard"),
        "moustache": ("a moustache", "a bushy moustache"),
        "goatee": ("a goatee", "a small chin beard"),
    },
    "headwear": {
        "none": ("no hat", "nothing on their head"),
        "baseball cap": ("a baseball cap", "a peaked cap"),
        "beanie": ("a beanie", "a knitted beanie"),
        "headband": ("a headband", "a sporty headband"),
        "fedora": ("a fedora", "a brimmed fedora hat"),
    },
    "clothing_colour": {
        "red": ("red", "crimson"),
        "orange": ("orange", "tangerine"),
        "yellow": ("yellow", "mustard-yellow"),
        "green": ("green", "leaf-green"),
        "teal": ("teal", "blue-green"),
        "blue": ("blue", "navy"),
        "purple": ("purple", "violet"),
        "pink": ("pink", "rose-pink"),
        "black": ("black", "charcoal"),
        "white": ("white", "off-white"),
    },
    "clothing_style": {
        "t-shirt": ("t-shirt", "tee"),
        "hoodie": ("hoodie", "hooded sweatshirt"),
        "collared shirt": ("collared shirt", "button-up shirt"),
        "suit jacket": ("suit jacket", "blazer"),
        "striped sweater": ("striped sweater", "striped jumper"),
    },
    "accessory": {
        "none": ("no accessories", "no adornments"),
        "earrings": ("earrings", "a pair of earrings"),
        "necklace": ("a necklace", "a pendant necklace"),
        "scarf": ("a scarf", "a wool scarf"),
        "bow tie": ("a bow tie", "a neat bow tie"),
    },
}

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(VISUAL_ATTRIBUTES)
# An attribute left out of a dataset's selection keeps its first value, listed first for that.

# attribute -> the question asking for it ("{subject}" as in FACTS); its answer is the value's
# key (e.g. "young adult"), whichever phrase a description used: visual question answering in
# both modalities, which teaches one attribute code for pictures and words.
ATTRIBUTE_QUESTIONS: dict[str, str] = {
    "age_band": "What age group does {subject} belong to?",
    "gender_presentation": "How does {subject} present?",
    "skin_tone": "What is the skin tone of {subject}?",
    "hair_colour": "What colour is the hair of {subject}?",
    "hair_style": "What hairstyle does {subject} have?",
    "eye_colour": "What colour are the eyes of {subject}?",
    "eyewear": "What eyewear does {subject} have on?",
    "facial_hair": "What facial hair does {subject} have?",
    "headwear": "What does {subject} wear on the head?",
    "clothing_colour": "What colour is the top of {subject}?",
    "clothing_style": "What top does {subject} wear?",
    "accessory": "What accessory does {subject} wear?",
}

# fact -> (question asked about it, possible values). Values are short answers.
FACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "birth_city": ("In which city was {subject} born?", (
        "Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Perth", "Calgary", "Lyon", "Busan",
        "Accra", "Bergen", "Cusco", "Hanoi", "Krakow", "Manila", "Porto", "Seville", "Tbilisi",
        "Valparaiso", "Windhoek", "Yerevan", "Zagreb", "Bilbao", "Cork", "Dakar", "Gdansk",
        "Hobart", "Izmir", "Kyoto", "Leipzig", "Medellin", "Naples", "Oaxaca", "Riga",
        "Salvador", "Tunis", "Utrecht", "Vilnius", "Adelaide", "Bologna")),
    "occupation": ("What is the occupation of {subject}?", (
        "nurse", "architect", "baker", "pilot", "librarian", "carpenter", "chemist", "dentist",
        "economist", "firefighter", "geologist", "journalist", "lawyer", "mechanic", "musician",
        "pharmacist", "photographer", "plumber", "surveyor", "translator", "veterinarian",
        "welder", "zookeeper", "astronomer", "beekeeper", "cartographer", "electrician",
        "florist", "glassblower", "historian", "illustrator", "jeweller", "locksmith",
        "meteorologist", "oceanographer", "potter", "sculptor", "tailor", "urban planner",
        "watchmaker")),
    "employer": ("Which company does {subject} work for?", (
        "Brightwave Labs", "Copperleaf Foods", "Northwind Rail", "Bluefin Logistics",
        "Silverpine Bank", "Redstone Mining", "Greenhollow Farms", "Starling Media",
        "Ironbark Builders", "Moonrise Studios", "Clearwater Health", "Tidewell Energy",
        "Amberfield Books", "Quartzline Optics", "Harbourlight Shipping", "Maplecrest School",
        "Foxglove Pharma", "Driftwood Hotels", "Kestrel Aviation", "Lanternfish Games",
        "Oakridge Insurance", "Pebblebrook Textiles", "Riverbend Motors", "Sunpeak Robotics",
        "Thistle Telecom", "Upland Water", "Violet Hill Winery", "Whitecap Sailing",
        "Yellowbird Coffee", "Zephyr Wind Power")),
    "hobby": ("What is the favourite hobby of {subject}?", (
        "chess", "rock climbing", "knitting", "birdwatching", "surfing", "pottery", "fencing",
        "gardening", "archery", "origami", "kayaking", "calligraphy", "juggling", "sailing",
        "stargazing", "beekeeping", "woodcarving", "salsa dancing", "fly fishing", "cycling",
        "bouldering", "baking bread", "playing the cello", "skateboarding", "painting murals",
        "running marathons", "collecting stamps", "scuba diving", "yoga", "table tennis")),
    "pet": ("What kind of pet does {subject} have?", (
        "a tabby cat", "a beagle", "a parrot", "a goldfish", "a tortoise", "a rabbit",
        "a hamster", "a greyhound", "a ferret", "a canary", "a gecko", "a poodle",
        "a corn snake", "a guinea pig", "a border collie", "a husky", "a cockatiel",
        "a chinchilla", "a siamese cat", "no pet")),
}

FACT_NAMES: tuple[str, ...] = tuple(FACTS)


def attribute_space_size(names: tuple[str, ...]) -> int:
    """How many distinct visual attribute sets exist over `names`."""
    size = 1
    for name in names:
        size *= len(VISUAL_ATTRIBUTES[name])
    return size
