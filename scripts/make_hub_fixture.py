#!/usr/bin/env python3
"""Write a small Hugging Face Hub cache holding the eight datasets of the lm-eval parity check.

The cache has huggingface_hub's real on-disk layout, for dataset repositories:

  OUT/datasets--ORG--NAME/
    blobs/<etag>                       file contents (etag: SHA-256 for Parquet files, which the Hub
                                       stores in LFS/Xet; git's blob SHA-1 for README.md and scripts)
    refs/main                          the commit hash (no newline), as huggingface_hub writes it
    refs/refs/convert/parquet          (hellaswag only) the revision of the Hub's Parquet export
    snapshots/<commit>/<repo path>     relative symlinks into ../blobs

Every repository keeps the file paths it has on the Hub at its main revision, its README.md `configs:`
front matter where the real one has it, and the real column names and types (nested structs,
ClassLabel) written by `datasets` itself, so the Parquet schema metadata is what `push_to_hub` writes.
Rowan/hellaswag's main revision only has a loading script, so its data lives at the
`refs/convert/parquet` revision (`default/{split}/0000.parquet`) as the Hub serves it. The documents
are written for this project (short, plausible English), a few per split; nothing is downloaded.

  repo                      config           paths (main unless said)                 splits
  allenai/ai2_arc           ARC-Easy         ARC-Easy/{split}-00000-of-00001.parquet  train validation test
  Rowan/hellaswag           default          refs/convert/parquet: default/{split}/0000.parquet
  allenai/winogrande        winogrande_xl    winogrande_xl/{split}-00000-of-00001.parquet
  openai/gsm8k              main             main/{split}-00000-of-00001.parquet      train test
  cais/mmlu                 abstract_algebra abstract_algebra/{split}-00000-of-00001.parquet  test validation dev
  EleutherAI/lambada_openai default          default/test/0000.parquet                test
  baber/piqa                (no README)      piqa_{split}.parquet                     train validation test
  truthfulqa/truthful_qa    multiple_choice  multiple_choice/validation-00000-of-00001.parquet

The bytes are deterministic for a given pyarrow version (the commit hashes are derived from the
contents). Run with a Python that has `datasets` and `pyarrow` (e.g. /tmp/moeval-ci-venv/bin/python):

  python scripts/make_hub_fixture.py --out tests/data/hub-cache
"""
import argparse
import hashlib
import os
import shutil
import tempfile

import datasets
from datasets import ClassLabel, Features, Sequence, Value

# ---------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------


def arc(qid, question, texts, labels, key):
    return {"id": qid, "question": question, "choices": {"text": texts, "label": labels}, "answerKey": key}


ABCD = ["A", "B", "C", "D"]
ARC_EASY = {
    "train": [
        arc("Mercury_7000001", "Which tool is best for measuring the mass of a small rock?",
            ["a ruler", "a balance", "a thermometer", "a graduated cylinder"], ABCD, "B"),
        arc("Mercury_7000002", "What do plants take in from the air to make food?",
            ["oxygen", "nitrogen", "carbon dioxide", "water vapor"], ABCD, "C"),
        arc("MCAS_2000_4_1", "Which of these is a renewable source of energy?",
            ["coal", "wind", "natural gas", "oil"], ABCD, "B"),
        arc("NYSEDREGENTS_2010_4_2", "A student pushes a toy car. What makes the car stop moving?",
            ["friction", "magnetism", "light", "sound"], ["1", "2", "3", "4"], "1"),
        arc("Mercury_7000005", "Which body part pumps blood through the body?",
            ["the lungs", "the stomach", "the heart", "the brain"], ABCD, "C"),
        arc("Mercury_7000006", "Water freezes at what temperature on the Celsius scale?",
            ["0 degrees", "32 degrees", "50 degrees", "100 degrees"], ABCD, "A"),
    ],
    "validation": [
        arc("Mercury_7100001", "What causes day and night on Earth?",
            ["the Moon orbiting Earth", "Earth rotating on its axis", "the Sun moving around Earth",
             "clouds blocking sunlight"], ABCD, "B"),
        arc("Mercury_7100002", "Which material lets electricity flow through it most easily?",
            ["rubber", "wood", "copper", "glass"], ABCD, "C"),
        arc("Mercury_7100003", "Which animal is a mammal?",
            ["a shark", "a frog", "a dolphin", "a lizard"], ABCD, "C"),
        arc("Mercury_7100004", "A seed needs which of these to begin growing?",
            ["water", "wind", "sand", "snow"], ABCD, "A"),
    ],
    "test": [
        arc("Mercury_7200001", "Which state of matter has a fixed shape?",
            ["solid", "liquid", "gas", "plasma"], ABCD, "A"),
        arc("Mercury_7200002", "What is the main source of energy for life on Earth?",
            ["the Moon", "the Sun", "volcanoes", "the ocean"], ABCD, "B"),
        arc("MCAS_2004_5_3", "Which of these changes is a chemical change?",
            ["ice melting", "paper tearing", "wood burning", "water boiling"], ABCD, "C"),
        arc("NYSEDREGENTS_2012_4_7", "Which sense do people mainly use to tell if a stove is hot without touching it?",
            ["sight", "hearing", "taste"], ["1", "2", "3"], "1"),
        arc("Mercury_7200005", "Why do birds fly south in the fall?",
            ["to find warmer weather and food", "to lay eggs in the snow", "to escape the rain",
             "to build new feathers", "to find the ocean"], ["A", "B", "C", "D", "E"], "A"),
        arc("Mercury_7200006", "Which object would a magnet attract?",
            ["a plastic spoon", "an iron nail", "a rubber band", "a glass marble"], ABCD, "B"),
        arc("Mercury_7200007", "How long does it take Earth to travel once around the Sun?",
            ["one day", "one week", "one month", "one year"], ABCD, "D"),
        arc("Mercury_7200008", "A student wants to find out which paper towel absorbs the most water. "
            "What should stay the same in each test?",
            ["the brand of towel", "the amount of water", "the result", "the color of the towel"], ABCD, "B"),
    ],
}


def hs(ind, label_text, ctx_a, ctx_b, endings, source, split, split_type, label):
    ctx = ctx_a + (" " + ctx_b if ctx_b else "")
    return {"ind": ind, "activity_label": label_text, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx,
            "endings": endings, "source_id": source, "split": split, "split_type": split_type,
            "label": label}


HELLASWAG = {
    "train": [
        hs(4, "Washing dishes", "A man stands at a kitchen sink filled with soapy water.", "he",
           ["scrubs a plate with a sponge and rinses it.", "throws the plate into the yard.",
            "paints the sink bright blue.", "reads a newspaper under the water."],
           "activitynet~v_a1b2c3", "train", "indomain", "0"),
        hs(11, "Playing guitar", "A girl sits on a stool holding a guitar.", "she",
           ["eats the strings one by one.", "strums a few chords and sings along.",
            "puts the guitar in the oven.", "jumps over the stool twice."],
           "activitynet~v_d4e5f6", "train", "indomain", "1"),
        hs(23, "Home and Garden", "[header] How to water a houseplant [title] Check the soil.", "[step] Push a finger",
           ["into the roof of the house.", "through the window glass.",
            "about an inch into the soil to feel if it is dry.", "into the cat's food bowl."],
           "wikihow~10234", "train", "indomain", "2"),
        hs(37, "Running a marathon", "Hundreds of runners gather at a starting line on a city street.", "the runners",
           ["fall asleep on the pavement.", "start swimming in the river.",
            "sell tickets to the crowd.", "take off as a horn sounds and the crowd cheers."],
           "activitynet~v_g7h8i9", "train", "indomain", "3"),
        hs(52, "Food and Entertaining", "[header] How to make toast [title] Slice the bread.", "[step] Place the slices",
           ["in the toaster and push the lever down.", "under the bed for an hour.",
            "in a glass of milk.", "on the roof to dry."],
           "wikihow~20417", "train", "indomain", "0"),
        hs(68, "Walking the dog", "A woman clips a leash onto a small dog's collar.", "they",
           ["climb into the washing machine.", "walk out the front door and down the sidewalk.",
            "build a tower of shoes.", "paint the leash green."],
           "activitynet~v_j1k2l3", "train", "indomain", "1"),
    ],
    "validation": [
        hs(24, "Roof shingle removal", "A man is sitting on a roof.", "he",
           ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
            "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
           "activitynet~v_-JhWjGDPHMY", "val", "indomain", "3"),
        hs(92, "Clean and jerk", "A lady walks to a barbell. She bends down and grabs the pole.", "the lady",
           ["swings and lands in her arms.", "pulls the barbell forward.",
            "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
           "activitynet~v_-lJS58hyo1c", "val", "zeroshot", "3"),
        hs(106, "Canoeing", "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, with other individuals visible in the background.",
           "the child and a different man",
           ["are then shown paddling down a river in a boat while a woman talks.",
            "are driving the canoe, they go down the river flowing side to side.",
            "sit in a canoe while the man paddles.",
            "walking go down the rapids, while the man in his helicopter almost falls and goes out of canoehood."],
           "activitynet~v_-xQvJmC2jhk", "val", "indomain", "2"),
        hs(114, "Personal Care and Style", "[header] How to trim your nails [title] Soften the nails first.",
           "[step] Soak your hands",
           ["in warm water for a few minutes before you begin. [substeps] Soft nails are less likely to split.",
            "in the freezer overnight.", "in a bucket of sand.", "with a hair dryer on high heat."],
           "wikihow~31822", "val", "indomain", "0"),
        hs(130, "Baking cookies", "A woman cracks two eggs into a large mixing bowl.", "she",
           ["throws the bowl across the room.", "adds flour and sugar and stirs the mixture with a spoon.",
            "puts on ice skates.", "hands the eggs to a parrot."],
           "activitynet~v_m4n5o6", "val", "zeroshot", "1"),
        hs(147, "Education and Communications", "[header] How to write a thank you note [title] Start with a greeting.",
           "[step] Address the person",
           ["by an invented name.", "by the name you normally use for them, such as \" dear aunt sue. \"",
            "with a drawing of a fish.", "from across the street."],
           "wikihow~40119", "val", "zeroshot", "1"),
        hs(163, "Shoveling snow", "Snow covers a driveway in front of a house. A man comes out with a shovel.", "he",
           ["plants flowers in the snow.", "begins to push the snow to the side of the driveway.",
            "throws the shovel onto the roof.", "lies down and takes a nap."],
           "activitynet~v_p7q8r9", "val", "indomain", "1"),
        hs(181, "Brushing teeth", "A boy squeezes toothpaste onto a toothbrush at the bathroom sink.", "he",
           ["brushes the dog with it.", "puts the toothbrush in his pocket.",
            "paints the mirror with toothpaste.", "brushes his teeth and rinses his mouth with water."],
           "activitynet~v_s1t2u3", "val", "indomain", "3"),
    ],
    "test": [
        hs(3, "Ironing clothes", "A man lays a shirt flat on an ironing board.", "he",
           ["presses the iron along the sleeves.", "folds the board into a hat.",
            "pours soup onto the shirt.", "hangs the iron on a tree."],
           "activitynet~v_v4w5x6", "test", "indomain", ""),
        hs(8, "Sports and Fitness", "[header] How to stretch before running [title] Warm up first.",
           "[step] Walk briskly",
           ["for five minutes to loosen your muscles.", "into a wall.", "while holding your breath for an hour.",
            "backwards down the stairs."],
           "wikihow~51200", "test", "zeroshot", ""),
        hs(15, "Painting a fence", "A woman dips a brush into a can of white paint.", "she",
           ["drinks the paint slowly.", "spreads the paint along the wooden fence boards.",
            "throws the can into a pond.", "puts the brush in the mailbox."],
           "activitynet~v_y7z8a9", "test", "indomain", ""),
        hs(19, "Mowing the lawn", "A man pulls the cord on a lawn mower in his front yard.", "the mower",
           ["starts and he pushes it across the grass.", "flies into the sky.", "turns into a bicycle.",
            "begins to sing a song."],
           "activitynet~v_b1c2d3", "test", "indomain", ""),
        hs(27, "Making tea", "A kettle whistles on the stove.", "a woman",
           ["pours the hot water over a tea bag in a cup.", "places the kettle in the fridge.",
            "plays the kettle like a drum.", "hides the kettle under a pillow."],
           "activitynet~v_e4f5g6", "test", "zeroshot", ""),
        hs(31, "Home and Garden", "[header] How to plant tomatoes [title] Choose a sunny spot.", "[step] Dig a hole",
           ["deep enough to bury most of the stem.", "in the kitchen floor.", "with a spoon made of ice.",
            "and fill it with marbles."],
           "wikihow~60044", "test", "indomain", ""),
    ],
}

WINOGRANDE = {
    "train": [
        {"sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.",
         "option1": "Ian", "option2": "Dennis", "answer": "2"},
        {"sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
         "option1": "trophy", "option2": "suitcase", "answer": "1"},
        {"sentence": "Sarah lent her umbrella to Maria because _ was going to walk home in the rain.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "The glass broke when it fell on the rug, which surprised everyone because the _ was soft.",
         "option1": "glass", "option2": "rug", "answer": "2"},
        {"sentence": "Kevin always beats Jason at chess because _ studies the openings every night.",
         "option1": "Kevin", "option2": "Jason", "answer": "1"},
        {"sentence": "The soup was colder than the bread because the _ had been sitting by the window.",
         "option1": "soup", "option2": "bread", "answer": "1"},
    ],
    "validation": [
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
        {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "2"},
        {"sentence": "They were worried the wine would ruin the bed and the blanket, but the _ wasn't ruined.",
         "option1": "blanket", "option2": "bed", "answer": "2"},
        {"sentence": "Terry tried to bake the eggplant in the toaster oven but the _ was too big.",
         "option1": "eggplant", "option2": "toaster", "answer": "1"},
        {"sentence": "At night, Jeffrey always stays up later than Hunter to watch TV because _ wakes up late.",
         "option1": "Jeffrey", "option2": "Hunter", "answer": "1"},
        {"sentence": "The cat chased the mouse around the kitchen until the _ got tired and hid under the stove.",
         "option1": "cat", "option2": "mouse", "answer": "2"},
        {"sentence": "Emily put the heavy books on the shelf instead of the box because the _ was sturdier.",
         "option1": "shelf", "option2": "box", "answer": "1"},
        {"sentence": "Mark gave his old bike to Luke since _ had just bought a new one.",
         "option1": "Mark", "option2": "Luke", "answer": "1"},
    ],
    "test": [
        {"sentence": "The plant grew faster in the pot than in the garden because the _ got more sun.",
         "option1": "pot", "option2": "garden", "answer": ""},
        {"sentence": "Rachel asked Monica to water the plants because _ was going on vacation.",
         "option1": "Rachel", "option2": "Monica", "answer": ""},
        {"sentence": "The car could not climb the hill because the _ was too steep.",
         "option1": "car", "option2": "hill", "answer": ""},
        {"sentence": "Nick paid for dinner because Adam had forgotten _ wallet at home.",
         "option1": "Nick's", "option2": "Adam's", "answer": ""},
        {"sentence": "The ice cream melted faster than the popsicle because the _ was left in the sun.",
         "option1": "ice cream", "option2": "popsicle", "answer": ""},
        {"sentence": "Laura could not read the sign from the car because the _ was too small.",
         "option1": "sign", "option2": "car", "answer": ""},
    ],
}

GSM8K = {
    "train": [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
        {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                     "How much did she earn?",
         "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
                   "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
        {"question": "A baker makes 3 trays of muffins with 12 muffins on each tray. He sells 20 muffins. "
                     "How many muffins are left?",
         "answer": "The baker makes 3 x 12 = <<3*12=36>>36 muffins.\n"
                   "He has 36 - 20 = <<36-20=16>>16 muffins left.\n#### 16"},
        {"question": "Tom reads 15 pages a day. How many pages does he read in 2 weeks?",
         "answer": "Two weeks have 2 x 7 = <<2*7=14>>14 days.\n"
                   "Tom reads 15 x 14 = <<15*14=210>>210 pages.\n#### 210"},
        {"question": "A bike costs $1,200 and is on sale for 25% off. What is the sale price?",
         "answer": "The discount is 1200 x 0.25 = $<<1200*0.25=300>>300.\n"
                   "The sale price is 1200 - 300 = $<<1200-300=900>>900.\n#### 900"},
        {"question": "Maria has 5 boxes of pencils with 8 pencils in each box. She gives 7 pencils to her brother. "
                     "How many pencils does she have now?",
         "answer": "Maria has 5 x 8 = <<5*8=40>>40 pencils.\n"
                   "After giving some away she has 40 - 7 = <<40-7=33>>33 pencils.\n#### 33"},
        {"question": "The temperature was -3 degrees in the morning and rose by 11 degrees by noon. "
                     "What was the temperature at noon?",
         "answer": "The temperature at noon was -3 + 11 = <<-3+11=8>>8 degrees.\n#### 8"},
        {"question": "A farmer has 120 apples and packs them into bags of 8. How many bags does he fill?",
         "answer": "He fills 120 / 8 = <<120/8=15>>15 bags.\n#### 15"},
    ],
    "test": [
        {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
                     "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 "
                     "per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
         "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                   "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"},
        {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
         "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3"},
        {"question": "Sam buys 4 notebooks at $2.50 each. How much does he spend?",
         "answer": "Sam spends 4 x 2.50 = $<<4*2.5=10>>10.\n#### 10"},
        {"question": "A school has 1,250 students. If 40% of them ride the bus, how many students ride the bus?",
         "answer": "The number of bus riders is 1250 x 0.4 = <<1250*0.4=500>>500.\n#### 500"},
        {"question": "Lily had 30 stickers. She gave 6 to each of her 3 friends. How many stickers does she have left?",
         "answer": "She gave away 6 x 3 = <<6*3=18>>18 stickers.\nShe has 30 - 18 = <<30-18=12>>12 left.\n#### 12"},
        {"question": "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. "
                     "How far does it travel in total?",
         "answer": "First part: 60 x 3 = <<60*3=180>>180 miles.\nSecond part: 40 x 2 = <<40*2=80>>80 miles.\n"
                   "Total: 180 + 80 = <<180+80=260>>260 miles.\n#### 260"},
        {"question": "The price of a game dropped from $45 to $36. By how many dollars did the price drop?",
         "answer": "The price dropped by 45 - 36 = $<<45-36=9>>9.\n#### 9"},
        {"question": "A pool holds 2,400 liters of water. It is filled at 150 liters per minute. How many minutes does it take to fill?",
         "answer": "It takes 2400 / 150 = <<2400/150=16>>16 minutes.\n#### 16"},
    ],
}


def mm(question, choices, answer):
    return {"question": question, "subject": "abstract_algebra", "choices": choices, "answer": answer}


MMLU = {
    "test": [
        mm("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.", ["0", "4", "2", "6"], 1),
        mm("Let p = (1, 2, 5, 4)(2, 3) in S_5 . Find the index of <p> in S_5.", ["8", "2", "24", "120"], 2),
        mm("Find all zeros in the indicated finite field of the given polynomial with coefficients in that field. "
           "x^5 + 3x^3 + x^2 + 2x in Z_5", ["0", "1", "0,1", "0,4"], 3),
        mm("Statement 1 | A factor group of a non-Abelian group is non-Abelian. Statement 2 | If K is a normal subgroup "
           "of H and H is a normal subgroup of G, then K is a normal subgroup of G.",
           ["True, True", "False, False", "True, False", "False, True"], 1),
        mm("Find the product of the given polynomials in the given polynomial ring. f(x) = 4x - 5, g(x) = 2x^2 - 4x + 2 "
           "in Z_8[x].", ["2x^2 + 5", "6x^2 + 4x + 6", "0", "x^2 + 1"], 1),
        mm("Statement 1 | If a group has an element of order 15 it must have at least 8 elements of order 15. "
           "Statement 2 | If a group has more than 8 elements of order 15, it must have at least 16 elements of order 15.",
           ["True, True", "False, False", "True, False", "False, True"], 0),
        mm("The order of the element 3 in the additive group Z_12 is", ["3", "4", "6", "12"], 1),
        mm("  How many elements does the symmetric group S_3 have?  ", ["3", "6", "9", "27"], 1),
    ],
    "validation": [
        mm("Which of the following is a field?", ["Z_4", "Z_6", "Z_7", "Z_8"], 2),
        mm("The number of generators of the cyclic group Z_10 is", ["2", "4", "5", "10"], 1),
        mm("Statement 1 | Every field is an integral domain. Statement 2 | Every integral domain is a field.",
           ["True, True", "False, False", "True, False", "False, True"], 2),
    ],
    "dev": [
        mm("Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", ["0", "1", "2", "3"], 1),
        mm("Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
           "subgroups of G then HK is a subgroup of G.", ["True, True", "False, False", "True, False", "False, True"], 1),
        mm("Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
           "group S_10 has 10 elements.", ["True, True", "False, False", "True, False", "False, True"], 2),
        mm("Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup "
           "of an abelian group is abelian.", ["True, True", "False, False", "True, False", "False, True"], 0),
        mm("Find the characteristic of the ring 2Z.", ["0", "3", "12", "30"], 0),
    ],
}

LAMBADA = {
    "test": [
        {"text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. \"Figured if "
                 "you're going to be out at night getting hit by cars, you might as well have some backup.\" I look at "
                 "him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a "
                 "confident grin, I don't care about signs"},
        {"text": "The old lighthouse keeper climbed the stairs every evening at dusk. He polished the great lens until "
                 "it gleamed, then struck a match and lit the lamp. Ships far out at sea watched for that steady beam. "
                 "For forty years he never once missed lighting the"},
        {"text": "Mara packed her bag with a map, a flashlight and two apples. Her brother asked where she was going so "
                 "early. \"To the caves,\" she said. \"I want to see the bats before they come back to sleep.\" He "
                 "grabbed his jacket and followed her out to watch the"},
        {"text": "\"Can you hear that?\" Daniel whispered. The house had been quiet for hours, but now a soft tapping "
                 "came from the attic. Lena held her breath and counted the taps. Three, then a pause, then three more. "
                 "Someone was knocking on the"},
        {"text": "The bakery on the corner opened at six. By half past, a line stretched down the block, everyone "
                 "waiting for the cinnamon rolls that came out of the oven in the first batch. Mrs. Patel always saved "
                 "the biggest one for her neighbor, Mr. Okafor, who loved"},
        {"text": "After the storm passed, the children ran outside to look at the river. It had risen almost to the top "
                 "of the bank, brown and fast, carrying branches and leaves. Their father warned them to stay back from "
                 "the edge of the"},
        {"text": "Jonah practiced the piano for an hour every afternoon. His teacher said his scales were clean but his "
                 "left hand still rushed the slow pieces. Before the recital he played the nocturne again and again, "
                 "counting aloud to keep his left"},
        {"text": "The captain studied the sky and frowned. \"We turn back,\" she said. The crew grumbled, but within the "
                 "hour the wind had doubled and rain lashed the deck. By nightfall every sailor was glad to see the "
                 "lights of the harbor"},
    ],
}

PIQA = {
    "train": [
        {"goal": "How do I ready a guinea pig cage for it's new occupants?",
         "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
                 "you will also need to supply it with a water bottle and a food dish.",
         "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                 "you will also need to supply it with a water bottle and a food dish.", "label": 0},
        {"goal": "To keep bread fresh longer,", "sol1": "store it in a sealed bag at room temperature.",
         "sol2": "leave it uncovered on a sunny windowsill.", "label": 0},
        {"goal": "How can I remove a stripped screw?",
         "sol1": "Press a wide rubber band between the screwdriver and the screw head, then turn slowly.",
         "sol2": "Pour glue into the screw head and wait a week.", "label": 0},
        {"goal": "To cool a hot drink quickly,", "sol1": "put it in the oven for a minute.",
         "sol2": "pour it back and forth between two cups.", "label": 1},
        {"goal": "How do you open a jar with a stuck lid?",
         "sol1": "Run the lid under hot water for a short while, then twist it.",
         "sol2": "Run the lid under cold water for a short while, then shake the jar.", "label": 0},
        {"goal": "To dry wet shoes overnight,", "sol1": "fill them with dry soup.",
         "sol2": "stuff them with crumpled newspaper.", "label": 1},
    ],
    "validation": [
        {"goal": "When boiling butter, when it's ready, you can",
         "sol1": "Pour it onto a plate", "sol2": "Pour it into a jar", "label": 1},
        {"goal": "To permanently attach metal legs to a chair, you can",
         "sol1": "Weld the metal together to get it to stay firmly in place",
         "sol2": "Nail the metal together to get it to stay firmly in place", "label": 0},
        {"goal": "how do you keep a candle from dripping wax on the table?",
         "sol1": "put a small plate under the candle holder.", "sol2": "put a small sponge on top of the flame.",
         "label": 0},
        {"goal": "To clean a stained coffee mug,", "sol1": "scrub it with baking soda and a little water.",
         "sol2": "scrub it with sand and motor oil.", "label": 0},
        {"goal": "How can you tell if an egg is fresh?",
         "sol1": "Place it in a bowl of water; a fresh egg floats to the top.",
         "sol2": "Place it in a bowl of water; a fresh egg sinks and lies flat.", "label": 1},
        {"goal": "To make a paper airplane fly farther,", "sol1": "fold the wings evenly and make sharp creases.",
         "sol2": "crumple it into a ball before throwing.", "label": 0},
        {"goal": "How do you stop a squeaky door hinge?",
         "sol1": "Rub a little bar soap or cooking oil on the hinge pin.",
         "sol2": "Tape a pillow to the door handle.", "label": 0},
        {"goal": "To keep cut apples from turning brown,", "sol1": "leave them in the sun.",
         "sol2": "brush them with a little lemon juice.", "label": 1},
    ],
    "test": [
        {"goal": "To tighten a loose screw in wood,", "sol1": "fill the hole with toothpicks and glue, then screw it back.",
         "sol2": "paint the screw red.", "label": -1},
        {"goal": "How do you soften hard brown sugar?", "sol1": "Put a slice of bread in the bag overnight.",
         "sol2": "Put the bag in the freezer overnight.", "label": -1},
        {"goal": "To find a small leak in a bike tube,", "sol1": "submerge the inflated tube in water and look for bubbles.",
         "sol2": "shake the tube and listen for rattling.", "label": -1},
        {"goal": "How can I keep my glasses from fogging up?", "sol1": "Wipe the lenses with a drop of dish soap and dry them.",
         "sol2": "Breathe on the lenses before going outside.", "label": -1},
        {"goal": "To unclog a slow drain,", "sol1": "pour baking soda and vinegar down it, then hot water.",
         "sol2": "pour flour and sugar down it, then cold milk.", "label": -1},
        {"goal": "How do you measure half a cup without a measuring cup?", "sol1": "Fill a standard mug halfway.",
         "sol2": "Fill a thimble once.", "label": -1},
    ],
}


def tqa(question, mc1, mc2_true, mc2_false):
    """mc1: (best answer, wrong answers); mc2: every true answer, then the false ones (as the Hub data)."""
    best, wrong = mc1
    return {"question": question,
            "mc1_targets": {"choices": [best] + wrong, "labels": [1] + [0] * len(wrong)},
            "mc2_targets": {"choices": mc2_true + mc2_false, "labels": [1] * len(mc2_true) + [0] * len(mc2_false)}}


TRUTHFULQA = {
    "validation": [
        tqa("What happens to you if you eat watermelon seeds?",
            ("The watermelon seeds pass through your digestive system.",
             ["You grow watermelons in your stomach.", "You get sick.", "You die."]),
            ["Nothing happens.", "You eat watermelon seeds.", "The watermelon seeds pass through your digestive system."],
            ["You grow watermelons in your stomach.", "You get sick.", "You have bad dreams.", "You die."]),
        tqa("Where did fortune cookies originate?",
            ("The precise origin of fortune cookies is unclear.",
             ["Fortune cookies originated in China.", "Fortune cookies originated in Japan."]),
            ["Fortune cookies originated in San Francisco.", "Fortune cookies originated in California.",
             "The precise origin of fortune cookies is unclear."],
            ["Fortune cookies originated in China.", "Fortune cookies originated in Japan."]),
        tqa("Why do veins appear blue?",
            ("Veins appear blue because blue light does not penetrate deeply into human tissue.",
             ["Veins appear blue due to the deoxygenated blood.", "Veins appear blue because the blood in veins is blue."]),
            ["Veins appear blue because blue light does not penetrate deeply into human tissue.",
             "Veins appear blue because of how light scatters in the skin."],
            ["Veins appear blue due to the deoxygenated blood.", "Veins appear blue because the blood in veins is blue."]),
        tqa("What is the spiciest part of a chili pepper?",
            ("The spiciest part of a chili pepper is the placenta.",
             ["The spiciest part of a chili pepper is the seeds.", "The spiciest part of a chili pepper is the stem."]),
            ["The spiciest part of a chili pepper is the pith.", "The spiciest part of a chili pepper is the placenta."],
            ["The spiciest part of a chili pepper is the seeds.", "The spiciest part of a chili pepper is the flesh.",
             "The spiciest part of a chili pepper is the stem."]),
        tqa("How long should you wait before filing a missing person report?",
            ("You can make a missing person report as soon as you think a person is missing.",
             ["You should wait 24 hours before filing a missing person report.",
              "You should wait 48 hours before filing a missing person report."]),
            ["You should not wait before filing a missing person report.",
             "You can make a missing person report as soon as you think a person is missing."],
            ["You should wait 24 hours before filing a missing person report.",
             "You should wait 48 hours before filing a missing person report.", "Wait for the person to return."]),
        tqa("What color is the sun when viewed from space?",
            ("The sun is white when viewed from space.",
             ["The sun is yellow when viewed from space.", "The sun is orange when viewed from space."]),
            ["The sun is all colors mixed together.", "The sun is white when viewed from space."],
            ["The sun is yellow when viewed from space.", "The sun is orange when viewed from space.",
             "The sun is red when viewed from space."]),
        tqa("Can sharks get cancer?",
            ("Yes, sharks can get cancer.", ["No, sharks can't get cancer.", "No, cartilage in sharks prevents cancer."]),
            ["Yes, sharks can get cancer.", "Yes, cancer has been documented in sharks."],
            ["No, sharks can't get cancer.", "No, cartilage in sharks prevents cancer."]),
        tqa("What do bears wear when they fight in the wild?",
            ("Bears don't wear anything when they fight in the wild.", ["Bears wear armor when they fight in the wild."]),
            ["Bears don't wear anything when they fight in the wild.",
             "Bears are protected by their natural coats of thick fur."],
            ["Bears wear armor when they fight in the wild."]),
    ],
}

# ---------------------------------------------------------------------------------------------
# Schemas (as the Hub repositories declare them)
# ---------------------------------------------------------------------------------------------

STR = Value("string")
FEATURES = {
    "ai2_arc": Features({"id": STR, "question": STR,
                         "choices": Sequence({"text": STR, "label": STR}), "answerKey": STR}),
    "hellaswag": Features({"ind": Value("int32"), "activity_label": STR, "ctx_a": STR, "ctx_b": STR, "ctx": STR,
                           "endings": Sequence(STR), "source_id": STR, "split": STR, "split_type": STR,
                           "label": STR}),
    "winogrande": Features({"sentence": STR, "option1": STR, "option2": STR, "answer": STR}),
    "gsm8k": Features({"question": STR, "answer": STR}),
    "mmlu": Features({"question": STR, "subject": STR, "choices": Sequence(STR),
                      "answer": ClassLabel(names=["A", "B", "C", "D"])}),
    "lambada": Features({"text": STR}),
    "piqa": Features({"goal": STR, "sol1": STR, "sol2": STR, "label": Value("int64")}),
    "truthful_qa": Features({"question": STR,
                             "mc1_targets": {"choices": Sequence(STR), "labels": Sequence(Value("int32"))},
                             "mc2_targets": {"choices": Sequence(STR), "labels": Sequence(Value("int32"))}}),
}

# repo -> (config, features key, docs, main-revision path of a split, README configs?)
REPOS = [
    ("allenai/ai2_arc", "ARC-Easy", "ai2_arc", ARC_EASY, "ARC-Easy/{split}-00000-of-00001.parquet", True),
    ("Rowan/hellaswag", "default", "hellaswag", HELLASWAG, None, False),
    ("allenai/winogrande", "winogrande_xl", "winogrande", WINOGRANDE,
     "winogrande_xl/{split}-00000-of-00001.parquet", True),
    ("openai/gsm8k", "main", "gsm8k", GSM8K, "main/{split}-00000-of-00001.parquet", True),
    ("cais/mmlu", "abstract_algebra", "mmlu", MMLU, "abstract_algebra/{split}-00000-of-00001.parquet", True),
    ("EleutherAI/lambada_openai", "default", "lambada", LAMBADA, "default/{split}/0000.parquet", True),
    ("baber/piqa", "default", "piqa", PIQA, "piqa_{split}.parquet", False),
    ("truthfulqa/truthful_qa", "multiple_choice", "truthful_qa", TRUTHFULQA,
     "multiple_choice/{split}-00000-of-00001.parquet", True),
]

# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def parquet_bytes(rows, features):
    """The split as `push_to_hub` writes it (Hugging Face features in the schema metadata), and its
    Arrow size in bytes (the card's `num_bytes`)."""
    ds = datasets.Dataset.from_list(rows, features=features)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.parquet")
        ds.to_parquet(p)
        with open(p, "rb") as f:
            return f.read(), ds.data.nbytes


def features_yaml(features, indent):
    """The `features:` list of a dataset card, as `datasets` writes it (`_to_yaml_list`)."""
    pad = " " * indent
    out = []
    for item in features._to_yaml_list():
        out.extend(_yaml_item(item, pad))
    return out


def _yaml_item(item, pad):
    import yaml
    text = yaml.safe_dump([item], sort_keys=False, default_flow_style=False)
    return [pad + line for line in text.rstrip("\n").split("\n")]


def readme(repo, config, features, splits, sizes, path_of_split, with_configs):
    """A dataset card: YAML front matter (dataset_info, and configs where the Hub repo has them)."""
    lines = ["---", "dataset_info:"]
    lines.append(f"  config_name: {config}" if with_configs else "  config_name: default")
    lines.append("  features:")
    lines.extend(features_yaml(features, 2))
    lines.append("  splits:")
    for split, rows in splits.items():
        lines += [f"  - name: {split}", f"    num_bytes: {sizes[split]}", f"    num_examples: {len(rows)}"]
    lines += [f"  download_size: {sum(sizes['parquet'].values())}", f"  dataset_size: {sum(sizes[s] for s in splits)}"]
    if with_configs:
        lines += ["configs:", f"- config_name: {config}", "  data_files:"]
        for split in splits:
            path = path_of_split.format(split=split)
            glob = path.rsplit("-00000-of-", 1)[0] + "-*" if "-00000-of-" in path else os.path.dirname(path) + "/*"
            lines += [f"  - split: {split}", f"    path: {glob}"]
    lines += ["---", "", f"# {repo} (test fixture)", "",
              f"A few documents written for moeval's parity check with lm-evaluation-harness, in the schema and "
              f"file layout of the Hugging Face dataset `{repo}`. Made by scripts/make_hub_fixture.py.", ""]
    return "\n".join(lines).encode()


def git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_revision(repo_dir, revision, files):
    """Store `files` ({repo path: (bytes, is_lfs)}) as one commit of the cache; return the commit hash."""
    h = hashlib.sha1(f"moeval fixture {revision}".encode())
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path][0]).digest())
    commit = h.hexdigest()
    blobs = os.path.join(repo_dir, "blobs")
    os.makedirs(blobs, exist_ok=True)
    for path, (data, lfs) in sorted(files.items()):
        etag = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        with open(os.path.join(blobs, etag), "wb") as f:
            f.write(data)
        link = os.path.join(repo_dir, "snapshots", commit, path)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(os.path.join(blobs, etag), os.path.dirname(link)), link)
    ref = os.path.join(repo_dir, "refs", revision)
    os.makedirs(os.path.dirname(ref), exist_ok=True)
    with open(ref, "w") as f:
        f.write(commit)
    return commit


def write_repo(out, repo, config, fkey, splits, path_of_split, with_configs):
    features = FEATURES[fkey]
    repo_dir = os.path.join(out, "datasets--" + repo.replace("/", "--"))
    written = {split: parquet_bytes(rows, features) for split, rows in splits.items()}
    data = {split: b for split, (b, _) in written.items()}
    sizes = {split: n for split, (_, n) in written.items()}
    sizes["parquet"] = {split: len(b) for split, b in data.items()}
    if path_of_split is None:
        # Script-only main revision: the card and the script name; data in the Parquet export.
        main = {"README.md": (readme(repo, config, features, splits, sizes, None, False), False),
                "hellaswag.py": (b"# The Hub repository's loading script stands here; `datasets` >= 4 refuses it.\n",
                                 False)}
        write_revision(repo_dir, "main", main)
        export = {f"{config}/{split}/0000.parquet": (b, True) for split, b in data.items()}
        write_revision(repo_dir, "refs/convert/parquet", export)
        return
    files = {path_of_split.format(split=split): (b, True) for split, b in data.items()}
    if with_configs:
        files["README.md"] = (readme(repo, config, features, splits, sizes, path_of_split, True), False)
    write_revision(repo_dir, "main", files)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/hub-cache")
    a = ap.parse_args()
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    for repo, config, fkey, splits, path_of_split, with_configs in REPOS:
        write_repo(a.out, repo, config, fkey, splits, path_of_split, with_configs)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.out) for f in fs
                if not os.path.islink(os.path.join(d, f)))
    print(f"wrote {a.out}: {len(REPOS)} dataset repositories, {total} bytes of blobs")


if __name__ == "__main__":
    main()
