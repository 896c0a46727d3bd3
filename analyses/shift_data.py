"""The built-in contexts of the embedding-shift studies.

Every cue comes before the target word, so a decoder (which sees only the left context)
can use it at the word itself; an encoder sees both sides. "tower" is lower case in every
context, so that it is one and the same token everywhere (SmolLM2 spells " Tower" and
" tower" differently) and layer 0 starts from one vector in a decoder.
"""

from __future__ import annotations

MOLE = {
    "animal": [
        "The American shrew mole lives in the damp forests of the Pacific coast.",
        "In the garden, the little burrowing mole dug tunnels under the lawn all night.",
        "The farmer set a trap for the mole that was ruining his vegetable beds.",
        "Like a shrew, the star-nosed mole hunts worms and insects underground.",
        "Our dog kept digging in the yard, chasing a blind mole through its burrows.",
        "With its huge front paws, the velvety mole can dig several metres of tunnel in an hour.",
        "Underground, the hungry mole eats its own weight in earthworms every day.",
        "The nature documentary followed a mole as it burrowed beneath the meadow.",
        "Owls and foxes hunt many small mammals, but the mole is rarely caught above ground.",
    ],
    "chemistry": [
        "The reaction produced one mole of carbon dioxide and two of water.",
        "In the chemistry lab, we weighed exactly one mole of sodium chloride.",
        "Avogadro's number tells you how many particles are in one mole of a substance.",
        "To make the solution, the student dissolved half a mole of glucose in a litre of water.",
        "At standard temperature and pressure, one mole of an ideal gas occupies 22.4 litres.",
        "The molar mass is the mass in grams of one mole of the compound.",
        "The chemist calculated the energy released per mole of fuel burned.",
        "Our chemistry teacher explained that a mole of carbon atoms weighs twelve grams.",
        "In the titration, every mole of acid was neutralised by the base.",
    ],
    "skin": [
        "To rule out melanoma, the doctor decided to take a biopsy of the mole.",
        "The dermatologist examined the dark mole on her shoulder.",
        "He noticed that the mole on his back had changed shape and colour.",
        "She has a small brown mole just above her upper lip.",
        "During the skin check, the nurse measured an irregular mole on his arm.",
        "The surgeon removed the suspicious mole under local anaesthetic.",
        "Because of the risk of skin cancer, any mole that itches or bleeds should be checked.",
        "After the skin cancer screening, the doctor said the raised mole on my neck was benign.",
        "The plastic surgeon said the facial mole could be removed with a laser.",
    ],
}

TOWER = {
    "eiffel": [
        "We took the elevator to the top of the Eiffel tower.",
        "From our hotel window in Paris we could see the Eiffel tower at night.",
        "Gustave Eiffel's company built the Eiffel tower for the 1889 World's Fair.",
        "Tourists queued for hours to climb the Eiffel tower and look over the Seine.",
        "The postcard from France showed the Eiffel tower lit up in gold.",
        "Every hour after sunset the Eiffel tower sparkles with thousands of lights.",
        "They got engaged on the second floor of the Eiffel tower during their trip.",
        "The wrought-iron lattice of the Eiffel tower was once criticised by Parisian artists.",
        "Standing on the Champ de Mars, she looked up at the Eiffel tower.",
    ],
    "miniature": [
        "On his desk stood a miniature tower made of matchsticks.",
        "The children built a miniature tower out of wooden blocks.",
        "The model railway had a miniature tower beside the tiny station.",
        "For the science fair, he glued together a miniature tower of drinking straws.",
        "The dollhouse came with a miniature tower and a little spiral staircase.",
        "In the fish tank sat a miniature tower for the goldfish to swim through.",
        "The architect showed the clients a miniature tower carved from balsa wood.",
        "A miniature tower of sugar cubes decorated the top of the cake.",
        "The toy castle set includes a miniature tower with a drawbridge.",
    ],
    "radio": [
        "The storm knocked down the radio tower outside town.",
        "Our phones had no signal because the nearest cell tower was out.",
        "The station broadcasts from a tall transmission tower on the hill.",
        "A red light blinks on top of the television tower to warn aircraft.",
        "Engineers climbed the mobile phone tower to replace the antenna.",
        "The village protested against a new 5G tower near the school.",
        "Signals from the broadcast tower reach listeners two hundred kilometres away.",
        "Lightning struck the steel antenna tower during the night.",
        "The radio amateur bolted a new aerial to his lattice tower in the backyard.",
    ],
}

STUDIES = {
    "mole": {"word": "mole", "senses": MOLE, "contrast": ("animal", "chemistry"), "track": [" tunnels", " of", " on"]},
    "tower": {"word": "tower", "senses": TOWER, "contrast": ("eiffel", "miniature"),
              "track": [" Paris", " in", " of"]},
}


def flatten(senses: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(contexts, labels) in sense order."""
    contexts = [c for cs in senses.values() for c in cs]
    labels = [s for s, cs in senses.items() for _ in cs]
    return contexts, labels
