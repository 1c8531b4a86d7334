"""The DreamBooth benchmark's prompt lists (Ruiz et al. 2023), 25 for objects and 25 for live subjects.

From the public google/dreambooth repository, licensed CC-BY 4.0 (https://github.com/google/dreambooth).
`{token}` is the trigger word (e.g. sks), `{noun}` the class noun (e.g. dog).
"""

_PLACES = (
    "a {token} {noun} in the jungle",
    "a {token} {noun} in the snow",
    "a {token} {noun} on the beach",
    "a {token} {noun} on a cobblestone street",
    "a {token} {noun} on top of pink fabric",
    "a {token} {noun} on top of a wooden floor",
    "a {token} {noun} with a city in the background",
    "a {token} {noun} with a mountain in the background",
    "a {token} {noun} with a blue house in the background",
    "a {token} {noun} on top of a purple rug in a forest",
)
_OBJECT_SCENES = (
    "a {token} {noun} with a wheat field in the background",
    "a {token} {noun} with a tree and autumn leaves in the background",
    "a {token} {noun} with the Eiffel Tower in the background",
    "a {token} {noun} floating on top of water",
    "a {token} {noun} floating in an ocean of milk",
    "a {token} {noun} on top of green grass with sunflowers around it",
    "a {token} {noun} on top of a mirror",
    "a {token} {noun} on top of the sidewalk in a crowded street",
    "a {token} {noun} on top of a dirt road",
    "a {token} {noun} on top of a white rug",
)
_OUTFITS = (
    "a {token} {noun} wearing a red hat",
    "a {token} {noun} wearing a santa hat",
    "a {token} {noun} wearing a rainbow scarf",
    "a {token} {noun} wearing a black top hat and a monocle",
    "a {token} {noun} in a chef outfit",
    "a {token} {noun} in a firefighter outfit",
    "a {token} {noun} in a police outfit",
    "a {token} {noun} wearing pink glasses",
    "a {token} {noun} wearing a yellow shirt",
    "a {token} {noun} in a purple wizard outfit",
)
_PROPERTIES = (
    "a red {token} {noun}",
    "a purple {token} {noun}",
    "a shiny {token} {noun}",
    "a wet {token} {noun}",
    "a cube shaped {token} {noun}",
)

OBJECT_PROMPTS = _PLACES + _OBJECT_SCENES + _PROPERTIES
LIVE_SUBJECT_PROMPTS = _PLACES + _OUTFITS + _PROPERTIES
