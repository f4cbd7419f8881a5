"""CLIP prompt templates and class names of the MTIL / continual-CLIP protocols, carried as data.

Sources (facts, not code):

* Template ensembles: ``mtil/src/datasets/collections.py`` and ``mtil/src/datasets/cifar10.py`` of the official ZSCL
  code (Thunderbeee/ZSCL), identical in MoE-Adapters4CL (JiazuoYu/MoE-Adapters4CL). Training uses the first template
  of a dataset, evaluation averages the normalised text embeddings over all of them. Counts: aircraft 2,
  caltech101 34, cifar100 18, dtd 8, eurosat 3, cars 9, sun397 2, the other MTIL datasets 1.
* ``imagenet``: the 80 CLIP ImageNet templates (open_clip ``OPENAI_IMAGENET_TEMPLATES``; ZSCL's
  ``openai_imagenet_template`` holds the same 80 strings in the same order).
* ``CIL_TEMPLATE``: ``prompt_template`` of MoE-Adapters4CL ``cil/configs/class/*.yaml`` (continual-CLIP protocol).
* ``cub`` and ``synthetic`` have no official ensemble: ``cub`` uses CLIP's bird template, ``synthetic`` two plain ones.
* Class names, in the official label order (the order of the torchvision dataset the official code loads):
  caltech101, eurosat and flowers are the lists written out in ZSCL's ``collections.py``; the others are what ZSCL gets
  from torchvision, after its ``process_labels`` (underscores to spaces): aircraft = ``variants.txt`` order (100
  variants), cifar100 = torchvision ``classes``, dtd = sorted folder names, food = ``sorted`` keys of
  ``meta/train.json`` (so "cheese plate" precedes "cheesecake"), mnist = torchvision ``"0 - zero"`` ..., pets =
  torchvision's title-cased breeds in class-id order, cars = ``cars_meta.mat`` order, sun397 = ``ClassName.txt`` minus
  the ``/x/`` prefix (so "apartment building/outdoor"). ``tinyimagenet`` is MoE-Adapters' ``tinyimagenet_classes.txt``
  in ``wnids.txt`` order (the label order of continuum's ``TinyImageNet200``, NOT sorted WordNet ids).

``clip_class_names`` maps the class names a source (a hub copy, a folder tree) reports onto these lists by name, so a
hub copy whose label order differs from the official one (ethz/food101, tanganke/sun397, zh-plus/tiny-imagenet) still
gets the right text for each of its labels.
"""

from __future__ import annotations

import re

__all__ = ["TEMPLATES", "CIL_TEMPLATE", "CLASS_NAMES", "RAW_NAMES", "OFFICIAL_TEMPLATE_COUNTS", "templates_for",
           "clip_class_names", "match_official", "clean_class_name"]

CIL_TEMPLATE = "a bad photo of a {}."
DEFAULT_TEMPLATE = "a photo of a {}."

TEMPLATES: dict[str, tuple[str, ...]] = {
    'aircraft': (
        'a photo of a {}, a type of aircraft.', 'a photo of the {}, a type of aircraft.',
    ),
    'caltech101': (
        'a photo of a {}.', 'a painting of a {}.', 'a plastic {}.', 'a sculpture of a {}.', 'a sketch of a {}.',
        'a tattoo of a {}.', 'a toy {}.', 'a rendition of a {}.', 'a embroidered {}.', 'a cartoon {}.',
        'a {} in a video game.', 'a plushie {}.', 'a origami {}.', 'art of a {}.', 'graffiti of a {}.',
        'a drawing of a {}.', 'a doodle of a {}.', 'a photo of the {}.', 'a painting of the {}.', 'the plastic {}.',
        'a sculpture of the {}.', 'a sketch of the {}.', 'a tattoo of the {}.', 'the toy {}.',
        'a rendition of the {}.', 'the embroidered {}.', 'the cartoon {}.', 'the {} in a video game.',
        'the plushie {}.', 'the origami {}.', 'art of the {}.', 'graffiti of the {}.', 'a drawing of the {}.',
        'a doodle of the {}.',
    ),
    'cifar100': (
        'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
        'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
        'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.', 'a photo of the {}.',
        'a blurry photo of the {}.', 'a black and white photo of the {}.', 'a low contrast photo of the {}.',
        'a high contrast photo of the {}.', 'a bad photo of the {}.', 'a good photo of the {}.',
        'a photo of the small {}.', 'a photo of the big {}.',
    ),
    'dtd': (
        'a photo of a {} texture.', 'a photo of a {} pattern.', 'a photo of a {} thing.', 'a photo of a {} object.',
        'a photo of the {} texture.', 'a photo of the {} pattern.', 'a photo of the {} thing.',
        'a photo of the {} object.',
    ),
    'eurosat': (
        'a centered satellite photo of {}.', 'a centered satellite photo of a {}.',
        'a centered satellite photo of the {}.',
    ),
    'flowers': (
        'a photo of a {}, a type of flower.',
    ),
    'food': (
        'a photo of a {}, a type of food.',
    ),
    'mnist': (
        'a photo of the number: "{}".',
    ),
    'pets': (
        'a photo of a {}, a type of pet.',
    ),
    'cars': (
        'a photo of a {}, a type of car.', 'a photo of a {}.', 'a photo of the {}.', 'a photo of my {}.',
        'i love my {}!', 'a photo of my dirty {}.', 'a photo of my clean {}.', 'a photo of my new {}.',
        'a photo of my old {}.',
    ),
    'sun397': (
        'a photo of a {}.', 'a photo of the {}.',
    ),
    'imagenet': (
        'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
        'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
        'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
        'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
        'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
        'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
        'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
        'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
        'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
        'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
        'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
        'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
        'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
        'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
        'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
        'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
        'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
        'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
        'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
        'a photo of a small {}.', 'a tattoo of the {}.',
    ),
    # CUB: no ensemble in the official code; CLIP's bird template.
    'cub': ('a photo of a {}, a type of bird.',),
    'synthetic': ('a photo of a {}.', 'an image of a {}.'),
    'default': (DEFAULT_TEMPLATE,),
}
# TinyImageNet: the CIL protocol prompts with CIL_TEMPLATE; its classes are ImageNet classes, so its ensemble is the
# ImageNet one (whose first template happens to be CIL_TEMPLATE).
TEMPLATES['tinyimagenet'] = TEMPLATES['imagenet']

# Template counts of the official MTIL evaluation (checked by tests/test_templates.py).
OFFICIAL_TEMPLATE_COUNTS: dict[str, int] = {
    "aircraft": 2, "caltech101": 34, "cifar100": 18, "dtd": 8, "eurosat": 3, "flowers": 1, "food": 1, "mnist": 1,
    "pets": 1, "cars": 9, "sun397": 2,
}

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    'aircraft': (
        '707-320', '727-200', '737-200', '737-300', '737-400', '737-500', '737-600', '737-700', '737-800', '737-900',
        '747-100', '747-200', '747-300', '747-400', '757-200', '757-300', '767-200', '767-300', '767-400', '777-200',
        '777-300', 'A300B4', 'A310', 'A318', 'A319', 'A320', 'A321', 'A330-200', 'A330-300', 'A340-200', 'A340-300',
        'A340-500', 'A340-600', 'A380', 'ATR-42', 'ATR-72', 'An-12', 'BAE 146-200', 'BAE 146-300', 'BAE-125',
        'Beechcraft 1900', 'Boeing 717', 'C-130', 'C-47', 'CRJ-200', 'CRJ-700', 'CRJ-900', 'Cessna 172', 'Cessna 208',
        'Cessna 525', 'Cessna 560', 'Challenger 600', 'DC-10', 'DC-3', 'DC-6', 'DC-8', 'DC-9-30', 'DH-82', 'DHC-1',
        'DHC-6', 'DHC-8-100', 'DHC-8-300', 'DR-400', 'Dornier 328', 'E-170', 'E-190', 'E-195', 'EMB-120', 'ERJ 135',
        'ERJ 145', 'Embraer Legacy 600', 'Eurofighter Typhoon', 'F-16A/B', 'F/A-18', 'Falcon 2000', 'Falcon 900',
        'Fokker 100', 'Fokker 50', 'Fokker 70', 'Global Express', 'Gulfstream IV', 'Gulfstream V', 'Hawk T1', 'Il-76',
        'L-1011', 'MD-11', 'MD-80', 'MD-87', 'MD-90', 'Metroliner', 'Model B200', 'PA-28', 'SR-20', 'Saab 2000',
        'Saab 340', 'Spitfire', 'Tornado', 'Tu-134', 'Tu-154', 'Yak-42',
    ),
    'caltech101': (
        'off-center face', 'centered face', 'leopard', 'motorbike', 'accordion', 'airplane', 'anchor', 'ant',
        'barrel', 'bass', 'beaver', 'binocular', 'bonsai', 'brain', 'brontosaurus', 'buddha', 'butterfly', 'camera',
        'cannon', 'side of a car', 'ceiling fan', 'cellphone', 'chair', 'chandelier', 'body of a cougar cat',
        'face of a cougar cat', 'crab', 'crayfish', 'crocodile', 'head of a  crocodile', 'cup', 'dalmatian',
        'dollar bill', 'dolphin', 'dragonfly', 'electric guitar', 'elephant', 'emu', 'euphonium', 'ewer', 'ferry',
        'flamingo', 'head of a flamingo', 'garfield', 'gerenuk', 'gramophone', 'grand piano', 'hawksbill',
        'headphone', 'hedgehog', 'helicopter', 'ibis', 'inline skate', 'joshua tree', 'kangaroo', 'ketch', 'lamp',
        'laptop', 'llama', 'lobster', 'lotus', 'mandolin', 'mayfly', 'menorah', 'metronome', 'minaret', 'nautilus',
        'octopus', 'okapi', 'pagoda', 'panda', 'pigeon', 'pizza', 'platypus', 'pyramid', 'revolver', 'rhino',
        'rooster', 'saxophone', 'schooner', 'scissors', 'scorpion', 'sea horse', 'snoopy (cartoon beagle)',
        'soccer ball', 'stapler', 'starfish', 'stegosaurus', 'stop sign', 'strawberry', 'sunflower', 'tick',
        'trilobite', 'umbrella', 'watch', 'water lilly', 'wheelchair', 'wild cat', 'windsor chair', 'wrench',
        'yin and yang symbol',
    ),
    'cifar100': (
        'apple', 'aquarium fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle', 'bicycle', 'bottle', 'bowl',
        'boy', 'bridge', 'bus', 'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee',
        'clock', 'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant',
        'flatfish', 'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard', 'lamp', 'lawn mower',
        'leopard', 'lion', 'lizard', 'lobster', 'man', 'maple tree', 'motorcycle', 'mountain', 'mouse', 'mushroom',
        'oak tree', 'orange', 'orchid', 'otter', 'palm tree', 'pear', 'pickup truck', 'pine tree', 'plain', 'plate',
        'poppy', 'porcupine', 'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark',
        'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider', 'squirrel', 'streetcar', 'sunflower',
        'sweet pepper', 'table', 'tank', 'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip',
        'turtle', 'wardrobe', 'whale', 'willow tree', 'wolf', 'woman', 'worm',
    ),
    'dtd': (
        'banded', 'blotchy', 'braided', 'bubbly', 'bumpy', 'chequered', 'cobwebbed', 'cracked', 'crosshatched',
        'crystalline', 'dotted', 'fibrous', 'flecked', 'freckled', 'frilly', 'gauzy', 'grid', 'grooved',
        'honeycombed', 'interlaced', 'knitted', 'lacelike', 'lined', 'marbled', 'matted', 'meshed', 'paisley',
        'perforated', 'pitted', 'pleated', 'polka-dotted', 'porous', 'potholed', 'scaly', 'smeared', 'spiralled',
        'sprinkled', 'stained', 'stratified', 'striped', 'studded', 'swirly', 'veined', 'waffled', 'woven',
        'wrinkled', 'zigzagged',
    ),
    'eurosat': (
        'annual crop land', 'forest', 'brushland or shrubland', 'highway or road',
        'industrial buildings or commercial buildings', 'pasture land', 'permanent crop land',
        'residential buildings or homes or apartments', 'river', 'lake or sea',
    ),
    'flowers': (
        'pink primrose', 'hard-leaved pocket orchid', 'canterbury bells', 'sweet pea', 'english marigold',
        'tiger lily', 'moon orchid', 'bird of paradise', 'monkshood', 'globe thistle', 'snapdragon', "colt's foot",
        'king protea', 'spear thistle', 'yellow iris', 'globe-flower', 'purple coneflower', 'peruvian lily',
        'balloon flower', 'giant white arum lily', 'fire lily', 'pincushion flower', 'fritillary', 'red ginger',
        'grape hyacinth', 'corn poppy', 'prince of wales feathers', 'stemless gentian', 'artichoke', 'sweet william',
        'carnation', 'garden phlox', 'love in the mist', 'mexican aster', 'alpine sea holly', 'ruby-lipped cattleya',
        'cape flower', 'great masterwort', 'siam tulip', 'lenten rose', 'barbeton daisy', 'daffodil', 'sword lily',
        'poinsettia', 'bolero deep blue', 'wallflower', 'marigold', 'buttercup', 'oxeye daisy', 'common dandelion',
        'petunia', 'wild pansy', 'primula', 'sunflower', 'pelargonium', 'bishop of llandaff', 'gaura', 'geranium',
        'orange dahlia', 'pink-yellow dahlia', 'cautleya spicata', 'japanese anemone', 'black-eyed susan',
        'silverbush', 'californian poppy', 'osteospermum', 'spring crocus', 'bearded iris', 'windflower',
        'tree poppy', 'gazania', 'azalea', 'water lily', 'rose', 'thorn apple', 'morning glory', 'passion flower',
        'lotus', 'toad lily', 'anthurium', 'frangipani', 'clematis', 'hibiscus', 'columbine', 'desert-rose',
        'tree mallow', 'magnolia', 'cyclamen', 'watercress', 'canna lily', 'hippeastrum', 'bee balm', 'ball moss',
        'foxglove', 'bougainvillea', 'camellia', 'mallow', 'mexican petunia', 'bromelia', 'blanket flower',
        'trumpet creeper', 'blackberry lily',
    ),
    'food': (
        'apple pie', 'baby back ribs', 'baklava', 'beef carpaccio', 'beef tartare', 'beet salad', 'beignets',
        'bibimbap', 'bread pudding', 'breakfast burrito', 'bruschetta', 'caesar salad', 'cannoli', 'caprese salad',
        'carrot cake', 'ceviche', 'cheese plate', 'cheesecake', 'chicken curry', 'chicken quesadilla',
        'chicken wings', 'chocolate cake', 'chocolate mousse', 'churros', 'clam chowder', 'club sandwich',
        'crab cakes', 'creme brulee', 'croque madame', 'cup cakes', 'deviled eggs', 'donuts', 'dumplings', 'edamame',
        'eggs benedict', 'escargots', 'falafel', 'filet mignon', 'fish and chips', 'foie gras', 'french fries',
        'french onion soup', 'french toast', 'fried calamari', 'fried rice', 'frozen yogurt', 'garlic bread',
        'gnocchi', 'greek salad', 'grilled cheese sandwich', 'grilled salmon', 'guacamole', 'gyoza', 'hamburger',
        'hot and sour soup', 'hot dog', 'huevos rancheros', 'hummus', 'ice cream', 'lasagna', 'lobster bisque',
        'lobster roll sandwich', 'macaroni and cheese', 'macarons', 'miso soup', 'mussels', 'nachos', 'omelette',
        'onion rings', 'oysters', 'pad thai', 'paella', 'pancakes', 'panna cotta', 'peking duck', 'pho', 'pizza',
        'pork chop', 'poutine', 'prime rib', 'pulled pork sandwich', 'ramen', 'ravioli', 'red velvet cake', 'risotto',
        'samosa', 'sashimi', 'scallops', 'seaweed salad', 'shrimp and grits', 'spaghetti bolognese',
        'spaghetti carbonara', 'spring rolls', 'steak', 'strawberry shortcake', 'sushi', 'tacos', 'takoyaki',
        'tiramisu', 'tuna tartare', 'waffles',
    ),
    'mnist': (
        '0 - zero', '1 - one', '2 - two', '3 - three', '4 - four', '5 - five', '6 - six', '7 - seven', '8 - eight',
        '9 - nine',
    ),
    'pets': (
        'Abyssinian', 'American Bulldog', 'American Pit Bull Terrier', 'Basset Hound', 'Beagle', 'Bengal', 'Birman',
        'Bombay', 'Boxer', 'British Shorthair', 'Chihuahua', 'Egyptian Mau', 'English Cocker Spaniel',
        'English Setter', 'German Shorthaired', 'Great Pyrenees', 'Havanese', 'Japanese Chin', 'Keeshond',
        'Leonberger', 'Maine Coon', 'Miniature Pinscher', 'Newfoundland', 'Persian', 'Pomeranian', 'Pug', 'Ragdoll',
        'Russian Blue', 'Saint Bernard', 'Samoyed', 'Scottish Terrier', 'Shiba Inu', 'Siamese', 'Sphynx',
        'Staffordshire Bull Terrier', 'Wheaten Terrier', 'Yorkshire Terrier',
    ),
    'cars': (
        'AM General Hummer SUV 2000', 'Acura RL Sedan 2012', 'Acura TL Sedan 2012', 'Acura TL Type-S 2008',
        'Acura TSX Sedan 2012', 'Acura Integra Type R 2001', 'Acura ZDX Hatchback 2012',
        'Aston Martin V8 Vantage Convertible 2012', 'Aston Martin V8 Vantage Coupe 2012',
        'Aston Martin Virage Convertible 2012', 'Aston Martin Virage Coupe 2012', 'Audi RS 4 Convertible 2008',
        'Audi A5 Coupe 2012', 'Audi TTS Coupe 2012', 'Audi R8 Coupe 2012', 'Audi V8 Sedan 1994',
        'Audi 100 Sedan 1994', 'Audi 100 Wagon 1994', 'Audi TT Hatchback 2011', 'Audi S6 Sedan 2011',
        'Audi S5 Convertible 2012', 'Audi S5 Coupe 2012', 'Audi S4 Sedan 2012', 'Audi S4 Sedan 2007',
        'Audi TT RS Coupe 2012', 'BMW ActiveHybrid 5 Sedan 2012', 'BMW 1 Series Convertible 2012',
        'BMW 1 Series Coupe 2012', 'BMW 3 Series Sedan 2012', 'BMW 3 Series Wagon 2012',
        'BMW 6 Series Convertible 2007', 'BMW X5 SUV 2007', 'BMW X6 SUV 2012', 'BMW M3 Coupe 2012',
        'BMW M5 Sedan 2010', 'BMW M6 Convertible 2010', 'BMW X3 SUV 2012', 'BMW Z4 Convertible 2012',
        'Bentley Continental Supersports Conv. Convertible 2012', 'Bentley Arnage Sedan 2009',
        'Bentley Mulsanne Sedan 2011', 'Bentley Continental GT Coupe 2012', 'Bentley Continental GT Coupe 2007',
        'Bentley Continental Flying Spur Sedan 2007', 'Bugatti Veyron 16.4 Convertible 2009',
        'Bugatti Veyron 16.4 Coupe 2009', 'Buick Regal GS 2012', 'Buick Rainier SUV 2007', 'Buick Verano Sedan 2012',
        'Buick Enclave SUV 2012', 'Cadillac CTS-V Sedan 2012', 'Cadillac SRX SUV 2012',
        'Cadillac Escalade EXT Crew Cab 2007', 'Chevrolet Silverado 1500 Hybrid Crew Cab 2012',
        'Chevrolet Corvette Convertible 2012', 'Chevrolet Corvette ZR1 2012',
        'Chevrolet Corvette Ron Fellows Edition Z06 2007', 'Chevrolet Traverse SUV 2012',
        'Chevrolet Camaro Convertible 2012', 'Chevrolet HHR SS 2010', 'Chevrolet Impala Sedan 2007',
        'Chevrolet Tahoe Hybrid SUV 2012', 'Chevrolet Sonic Sedan 2012', 'Chevrolet Express Cargo Van 2007',
        'Chevrolet Avalanche Crew Cab 2012', 'Chevrolet Cobalt SS 2010', 'Chevrolet Malibu Hybrid Sedan 2010',
        'Chevrolet TrailBlazer SS 2009', 'Chevrolet Silverado 2500HD Regular Cab 2012',
        'Chevrolet Silverado 1500 Classic Extended Cab 2007', 'Chevrolet Express Van 2007',
        'Chevrolet Monte Carlo Coupe 2007', 'Chevrolet Malibu Sedan 2007',
        'Chevrolet Silverado 1500 Extended Cab 2012', 'Chevrolet Silverado 1500 Regular Cab 2012',
        'Chrysler Aspen SUV 2009', 'Chrysler Sebring Convertible 2010', 'Chrysler Town and Country Minivan 2012',
        'Chrysler 300 SRT-8 2010', 'Chrysler Crossfire Convertible 2008', 'Chrysler PT Cruiser Convertible 2008',
        'Daewoo Nubira Wagon 2002', 'Dodge Caliber Wagon 2012', 'Dodge Caliber Wagon 2007',
        'Dodge Caravan Minivan 1997', 'Dodge Ram Pickup 3500 Crew Cab 2010', 'Dodge Ram Pickup 3500 Quad Cab 2009',
        'Dodge Sprinter Cargo Van 2009', 'Dodge Journey SUV 2012', 'Dodge Dakota Crew Cab 2010',
        'Dodge Dakota Club Cab 2007', 'Dodge Magnum Wagon 2008', 'Dodge Challenger SRT8 2011',
        'Dodge Durango SUV 2012', 'Dodge Durango SUV 2007', 'Dodge Charger Sedan 2012', 'Dodge Charger SRT-8 2009',
        'Eagle Talon Hatchback 1998', 'FIAT 500 Abarth 2012', 'FIAT 500 Convertible 2012', 'Ferrari FF Coupe 2012',
        'Ferrari California Convertible 2012', 'Ferrari 458 Italia Convertible 2012', 'Ferrari 458 Italia Coupe 2012',
        'Fisker Karma Sedan 2012', 'Ford F-450 Super Duty Crew Cab 2012', 'Ford Mustang Convertible 2007',
        'Ford Freestar Minivan 2007', 'Ford Expedition EL SUV 2009', 'Ford Edge SUV 2012',
        'Ford Ranger SuperCab 2011', 'Ford GT Coupe 2006', 'Ford F-150 Regular Cab 2012',
        'Ford F-150 Regular Cab 2007', 'Ford Focus Sedan 2007', 'Ford E-Series Wagon Van 2012',
        'Ford Fiesta Sedan 2012', 'GMC Terrain SUV 2012', 'GMC Savana Van 2012', 'GMC Yukon Hybrid SUV 2012',
        'GMC Acadia SUV 2012', 'GMC Canyon Extended Cab 2012', 'Geo Metro Convertible 1993',
        'HUMMER H3T Crew Cab 2010', 'HUMMER H2 SUT Crew Cab 2009', 'Honda Odyssey Minivan 2012',
        'Honda Odyssey Minivan 2007', 'Honda Accord Coupe 2012', 'Honda Accord Sedan 2012',
        'Hyundai Veloster Hatchback 2012', 'Hyundai Santa Fe SUV 2012', 'Hyundai Tucson SUV 2012',
        'Hyundai Veracruz SUV 2012', 'Hyundai Sonata Hybrid Sedan 2012', 'Hyundai Elantra Sedan 2007',
        'Hyundai Accent Sedan 2012', 'Hyundai Genesis Sedan 2012', 'Hyundai Sonata Sedan 2012',
        'Hyundai Elantra Touring Hatchback 2012', 'Hyundai Azera Sedan 2012', 'Infiniti G Coupe IPL 2012',
        'Infiniti QX56 SUV 2011', 'Isuzu Ascender SUV 2008', 'Jaguar XK XKR 2012', 'Jeep Patriot SUV 2012',
        'Jeep Wrangler SUV 2012', 'Jeep Liberty SUV 2012', 'Jeep Grand Cherokee SUV 2012', 'Jeep Compass SUV 2012',
        'Lamborghini Reventon Coupe 2008', 'Lamborghini Aventador Coupe 2012',
        'Lamborghini Gallardo LP 570-4 Superleggera 2012', 'Lamborghini Diablo Coupe 2001',
        'Land Rover Range Rover SUV 2012', 'Land Rover LR2 SUV 2012', 'Lincoln Town Car Sedan 2011',
        'MINI Cooper Roadster Convertible 2012', 'Maybach Landaulet Convertible 2012', 'Mazda Tribute SUV 2011',
        'McLaren MP4-12C Coupe 2012', 'Mercedes-Benz 300-Class Convertible 1993', 'Mercedes-Benz C-Class Sedan 2012',
        'Mercedes-Benz SL-Class Coupe 2009', 'Mercedes-Benz E-Class Sedan 2012', 'Mercedes-Benz S-Class Sedan 2012',
        'Mercedes-Benz Sprinter Van 2012', 'Mitsubishi Lancer Sedan 2012', 'Nissan Leaf Hatchback 2012',
        'Nissan NV Passenger Van 2012', 'Nissan Juke Hatchback 2012', 'Nissan 240SX Coupe 1998',
        'Plymouth Neon Coupe 1999', 'Porsche Panamera Sedan 2012', 'Ram C/V Cargo Van Minivan 2012',
        'Rolls-Royce Phantom Drophead Coupe Convertible 2012', 'Rolls-Royce Ghost Sedan 2012',
        'Rolls-Royce Phantom Sedan 2012', 'Scion xD Hatchback 2012', 'Spyker C8 Convertible 2009',
        'Spyker C8 Coupe 2009', 'Suzuki Aerio Sedan 2007', 'Suzuki Kizashi Sedan 2012', 'Suzuki SX4 Hatchback 2012',
        'Suzuki SX4 Sedan 2012', 'Tesla Model S Sedan 2012', 'Toyota Sequoia SUV 2012', 'Toyota Camry Sedan 2012',
        'Toyota Corolla Sedan 2012', 'Toyota 4Runner SUV 2012', 'Volkswagen Golf Hatchback 2012',
        'Volkswagen Golf Hatchback 1991', 'Volkswagen Beetle Hatchback 2012', 'Volvo C30 Hatchback 2012',
        'Volvo 240 Sedan 1993', 'Volvo XC90 SUV 2007', 'smart fortwo Convertible 2012',
    ),
    'sun397': (
        'abbey', 'airplane cabin', 'airport terminal', 'alley', 'amphitheater', 'amusement arcade', 'amusement park',
        'anechoic chamber', 'apartment building/outdoor', 'apse/indoor', 'aquarium', 'aqueduct', 'arch', 'archive',
        'arrival gate/outdoor', 'art gallery', 'art school', 'art studio', 'assembly line', 'athletic field/outdoor',
        'atrium/public', 'attic', 'auditorium', 'auto factory', 'badlands', 'badminton court/indoor', 'baggage claim',
        'bakery/shop', 'balcony/exterior', 'balcony/interior', 'ball pit', 'ballroom', 'bamboo forest',
        'banquet hall', 'bar', 'barn', 'barndoor', 'baseball field', 'basement', 'basilica',
        'basketball court/outdoor', 'bathroom', 'batters box', 'bayou', 'bazaar/indoor', 'bazaar/outdoor', 'beach',
        'beauty salon', 'bedroom', 'berth', 'biology laboratory', 'bistro/indoor', 'boardwalk', 'boat deck',
        'boathouse', 'bookstore', 'booth/indoor', 'botanical garden', 'bow window/indoor', 'bow window/outdoor',
        'bowling alley', 'boxing ring', 'brewery/indoor', 'bridge', 'building facade', 'bullring', 'burial chamber',
        'bus interior', 'butchers shop', 'butte', 'cabin/outdoor', 'cafeteria', 'campsite', 'campus', 'canal/natural',
        'canal/urban', 'candy store', 'canyon', 'car interior/backseat', 'car interior/frontseat', 'carrousel',
        'casino/indoor', 'castle', 'catacomb', 'cathedral/indoor', 'cathedral/outdoor', 'cavern/indoor', 'cemetery',
        'chalet', 'cheese factory', 'chemistry lab', 'chicken coop/indoor', 'chicken coop/outdoor', 'childs room',
        'church/indoor', 'church/outdoor', 'classroom', 'clean room', 'cliff', 'cloister/indoor', 'closet',
        'clothing store', 'coast', 'cockpit', 'coffee shop', 'computer room', 'conference center', 'conference room',
        'construction site', 'control room', 'control tower/outdoor', 'corn field', 'corral', 'corridor',
        'cottage garden', 'courthouse', 'courtroom', 'courtyard', 'covered bridge/exterior', 'creek', 'crevasse',
        'crosswalk', 'cubicle/office', 'dam', 'delicatessen', 'dentists office', 'desert/sand', 'desert/vegetation',
        'diner/indoor', 'diner/outdoor', 'dinette/home', 'dinette/vehicle', 'dining car', 'dining room',
        'discotheque', 'dock', 'doorway/outdoor', 'dorm room', 'driveway', 'driving range/outdoor', 'drugstore',
        'electrical substation', 'elevator/door', 'elevator/interior', 'elevator shaft', 'engine room',
        'escalator/indoor', 'excavation', 'factory/indoor', 'fairway', 'fastfood restaurant', 'field/cultivated',
        'field/wild', 'fire escape', 'fire station', 'firing range/indoor', 'fishpond', 'florist shop/indoor',
        'food court', 'forest/broadleaf', 'forest/needleleaf', 'forest path', 'forest road', 'formal garden',
        'fountain', 'galley', 'game room', 'garage/indoor', 'garbage dump', 'gas station', 'gazebo/exterior',
        'general store/indoor', 'general store/outdoor', 'gift shop', 'golf course', 'greenhouse/indoor',
        'greenhouse/outdoor', 'gymnasium/indoor', 'hangar/indoor', 'hangar/outdoor', 'harbor', 'hayfield', 'heliport',
        'herb garden', 'highway', 'hill', 'home office', 'hospital', 'hospital room', 'hot spring', 'hot tub/outdoor',
        'hotel/outdoor', 'hotel room', 'house', 'hunting lodge/outdoor', 'ice cream parlor', 'ice floe', 'ice shelf',
        'ice skating rink/indoor', 'ice skating rink/outdoor', 'iceberg', 'igloo', 'industrial area', 'inn/outdoor',
        'islet', 'jacuzzi/indoor', 'jail/indoor', 'jail cell', 'jewelry shop', 'kasbah', 'kennel/indoor',
        'kennel/outdoor', 'kindergarden classroom', 'kitchen', 'kitchenette', 'labyrinth/outdoor', 'lake/natural',
        'landfill', 'landing deck', 'laundromat', 'lecture room', 'library/indoor', 'library/outdoor',
        'lido deck/outdoor', 'lift bridge', 'lighthouse', 'limousine interior', 'living room', 'lobby',
        'lock chamber', 'locker room', 'mansion', 'manufactured home', 'market/indoor', 'market/outdoor', 'marsh',
        'martial arts gym', 'mausoleum', 'medina', 'moat/water', 'monastery/outdoor', 'mosque/indoor',
        'mosque/outdoor', 'motel', 'mountain', 'mountain snowy', 'movie theater/indoor', 'museum/indoor',
        'music store', 'music studio', 'nuclear power plant/outdoor', 'nursery', 'oast house', 'observatory/outdoor',
        'ocean', 'office', 'office building', 'oil refinery/outdoor', 'oilrig', 'operating room', 'orchard',
        'outhouse/outdoor', 'pagoda', 'palace', 'pantry', 'park', 'parking garage/indoor', 'parking garage/outdoor',
        'parking lot', 'parlor', 'pasture', 'patio', 'pavilion', 'pharmacy', 'phone booth', 'physics laboratory',
        'picnic area', 'pilothouse/indoor', 'planetarium/outdoor', 'playground', 'playroom', 'plaza', 'podium/indoor',
        'podium/outdoor', 'pond', 'poolroom/establishment', 'poolroom/home', 'power plant/outdoor', 'promenade deck',
        'pub/indoor', 'pulpit', 'putting green', 'racecourse', 'raceway', 'raft', 'railroad track', 'rainforest',
        'reception', 'recreation room', 'residential neighborhood', 'restaurant', 'restaurant kitchen',
        'restaurant patio', 'rice paddy', 'riding arena', 'river', 'rock arch', 'rope bridge', 'ruin', 'runway',
        'sandbar', 'sandbox', 'sauna', 'schoolhouse', 'sea cliff', 'server room', 'shed', 'shoe shop', 'shopfront',
        'shopping mall/indoor', 'shower', 'skatepark', 'ski lodge', 'ski resort', 'ski slope', 'sky', 'skyscraper',
        'slum', 'snowfield', 'squash court', 'stable', 'stadium/baseball', 'stadium/football', 'stage/indoor',
        'staircase', 'street', 'subway interior', 'subway station/platform', 'supermarket', 'sushi bar', 'swamp',
        'swimming pool/indoor', 'swimming pool/outdoor', 'synagogue/indoor', 'synagogue/outdoor', 'television studio',
        'temple/east asia', 'temple/south asia', 'tennis court/indoor', 'tennis court/outdoor', 'tent/outdoor',
        'theater/indoor procenium', 'theater/indoor seats', 'thriftshop', 'throne room', 'ticket booth', 'toll plaza',
        'topiary garden', 'tower', 'toyshop', 'track/outdoor', 'train railway', 'train station/platform', 'tree farm',
        'tree house', 'trench', 'underwater/coral reef', 'utility room', 'valley', 'van interior', 'vegetable garden',
        'veranda', 'veterinarians office', 'viaduct', 'videostore', 'village', 'vineyard', 'volcano',
        'volleyball court/indoor', 'volleyball court/outdoor', 'waiting room', 'warehouse/indoor', 'water tower',
        'waterfall/block', 'waterfall/fan', 'waterfall/plunge', 'watering hole', 'wave', 'wet bar', 'wheat field',
        'wind farm', 'windmill', 'wine cellar/barrel storage', 'wine cellar/bottle storage', 'wrestling ring/indoor',
        'yard', 'youth hostel',
    ),
    'tinyimagenet': (
        'Egyptian Mau', 'fishing casting reel', 'volleyball', 'rocking chair', 'lemon', 'American bullfrog',
        'basketball', 'cliff', 'espresso', 'plunger', 'parking meter', 'German Shepherd Dog', 'dining table',
        'monarch butterfly', 'brown bear', 'school bus', 'pizza', 'guinea pig', 'umbrella', 'pipe organ', 'oboe',
        'maypole', 'goldfish', 'pot pie', 'hourglass', 'beach', 'computer keyboard', 'arabian camel', 'ice cream',
        'metal nail', 'space heater', 'cardigan', 'baboon', 'snail', 'coral reef', 'albatross', 'spider web',
        'sea cucumber', 'backpack', 'Labrador Retriever', 'pretzel', 'king penguin', 'sulphur butterfly', 'tarantula',
        'red panda', 'soda bottle', 'banana', 'sock', 'cockroach', 'missile', 'beer bottle', 'praying mantis',
        'freight car', 'guacamole', 'remote control', 'fire salamander', 'lakeshore', 'chimpanzee', 'payphone',
        'fur coat', 'mountain', 'lampshade', 'torch', 'abacus', 'moving van', 'barrel', 'tabby cat', 'goose', 'koala',
        'high-speed train', 'CD player', 'teapot', 'birdhouse', 'gazelle', 'academic gown', 'tractor', 'ladybug',
        'miniskirt', 'Golden Retriever', 'triumphal arch', 'cannon', 'neck brace', 'sombrero',
        'gas mask or respirator', 'candle', 'desk', 'frying pan', 'bee', 'dam', 'spiny lobster', 'police van', 'iPod',
        'punching bag', 'lighthouse', 'jellyfish', 'wok', "potter's wheel", 'sandal', 'pill bottle', 'butcher shop',
        'slug', 'pig', 'cougar', 'construction crane', 'vestment', 'dragonfly', 'automated teller machine',
        'mushroom', 'rickshaw', 'water tower', 'storage chest', 'snorkel', 'sunglasses', 'fly', 'limousine',
        'black stork', 'dugong', 'sports car', 'water jug', 'suspension bridge', 'ox', 'popsicle', 'turnstile',
        'Christmas stocking', 'broom', 'scorpion', 'wooden spoon', 'picket fence', 'rugby ball', 'sewing machine',
        'through arch bridge', 'Persian cat', 'refrigerator', 'barn', 'apron', 'Yorkshire Terrier',
        'swim trunks / shorts', 'stopwatch', 'lawn mower', 'thatched roof', 'fountain', 'southern black widow',
        'bikini', 'plate', 'teddy bear', 'barbershop', 'candy store', 'station wagon', 'scoreboard', 'orange',
        'flagpole', 'American lobster', 'trolleybus', 'drumstick', 'dumbbell', 'brass memorial plaque', 'bow tie',
        'convertible', 'bighorn sheep', 'orangutan', 'American alligator', 'centipede', 'syringe', 'go-kart',
        'brain coral', 'sea slug', 'cliff dwelling', 'mashed potatoes', 'viaduct', 'military uniform', 'pomegranate',
        'chain', 'kimono', 'comic book', 'trilobite', 'bison', 'pole', 'boa constrictor', 'poncho', 'bathtub',
        'grasshopper', 'stick insect', 'Chihuahua', 'tailed frog', 'lion', 'altar', 'obelisk', 'beaker',
        'bell pepper', 'baluster / handrail', 'bucket', 'magnetic compass', 'meatloaf', 'gondola', 'Standard Poodle',
        'acorn', 'lifeboat', 'binoculars', 'cauliflower', 'African bush elephant',
    ),
}

# The source's own names for the same labels, where they are not recoverable by cleaning the official names
# (same order as CLASS_NAMES): folder names of Caltech-101 / EuroSAT, digits for MNIST, WordNet ids for TinyImageNet.
RAW_NAMES: dict[str, tuple[str, ...]] = {
    'caltech101': (
        'Faces', 'Faces_easy', 'Leopards', 'Motorbikes', 'accordion', 'airplanes', 'anchor', 'ant', 'barrel', 'bass',
        'beaver', 'binocular', 'bonsai', 'brain', 'brontosaurus', 'buddha', 'butterfly', 'camera', 'cannon',
        'car_side', 'ceiling_fan', 'cellphone', 'chair', 'chandelier', 'cougar_body', 'cougar_face', 'crab',
        'crayfish', 'crocodile', 'crocodile_head', 'cup', 'dalmatian', 'dollar_bill', 'dolphin', 'dragonfly',
        'electric_guitar', 'elephant', 'emu', 'euphonium', 'ewer', 'ferry', 'flamingo', 'flamingo_head', 'garfield',
        'gerenuk', 'gramophone', 'grand_piano', 'hawksbill', 'headphone', 'hedgehog', 'helicopter', 'ibis',
        'inline_skate', 'joshua_tree', 'kangaroo', 'ketch', 'lamp', 'laptop', 'llama', 'lobster', 'lotus', 'mandolin',
        'mayfly', 'menorah', 'metronome', 'minaret', 'nautilus', 'octopus', 'okapi', 'pagoda', 'panda', 'pigeon',
        'pizza', 'platypus', 'pyramid', 'revolver', 'rhino', 'rooster', 'saxophone', 'schooner', 'scissors',
        'scorpion', 'sea_horse', 'snoopy', 'soccer_ball', 'stapler', 'starfish', 'stegosaurus', 'stop_sign',
        'strawberry', 'sunflower', 'tick', 'trilobite', 'umbrella', 'watch', 'water_lilly', 'wheelchair', 'wild_cat',
        'windsor_chair', 'wrench', 'yin_yang',
    ),
    'eurosat': (
        'AnnualCrop', 'Forest', 'HerbaceousVegetation', 'Highway', 'Industrial', 'Pasture', 'PermanentCrop',
        'Residential', 'River', 'SeaLake',
    ),
    'mnist': (
        '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
    ),
    'tinyimagenet': (
        'n02124075', 'n04067472', 'n04540053', 'n04099969', 'n07749582', 'n01641577', 'n02802426', 'n09246464',
        'n07920052', 'n03970156', 'n03891332', 'n02106662', 'n03201208', 'n02279972', 'n02132136', 'n04146614',
        'n07873807', 'n02364673', 'n04507155', 'n03854065', 'n03838899', 'n03733131', 'n01443537', 'n07875152',
        'n03544143', 'n09428293', 'n03085013', 'n02437312', 'n07614500', 'n03804744', 'n04265275', 'n02963159',
        'n02486410', 'n01944390', 'n09256479', 'n02058221', 'n04275548', 'n02321529', 'n02769748', 'n02099712',
        'n07695742', 'n02056570', 'n02281406', 'n01774750', 'n02509815', 'n03983396', 'n07753592', 'n04254777',
        'n02233338', 'n04008634', 'n02823428', 'n02236044', 'n03393912', 'n07583066', 'n04074963', 'n01629819',
        'n09332890', 'n02481823', 'n03902125', 'n03404251', 'n09193705', 'n03637318', 'n04456115', 'n02666196',
        'n03796401', 'n02795169', 'n02123045', 'n01855672', 'n01882714', 'n02917067', 'n02988304', 'n04398044',
        'n02843684', 'n02423022', 'n02669723', 'n04465501', 'n02165456', 'n03770439', 'n02099601', 'n04486054',
        'n02950826', 'n03814639', 'n04259630', 'n03424325', 'n02948072', 'n03179701', 'n03400231', 'n02206856',
        'n03160309', 'n01984695', 'n03977966', 'n03584254', 'n04023962', 'n02814860', 'n01910747', 'n04596742',
        'n03992509', 'n04133789', 'n03937543', 'n02927161', 'n01945685', 'n02395406', 'n02125311', 'n03126707',
        'n04532106', 'n02268443', 'n02977058', 'n07734744', 'n03599486', 'n04562935', 'n03014705', 'n04251144',
        'n04356056', 'n02190166', 'n03670208', 'n02002724', 'n02074367', 'n04285008', 'n04560804', 'n04366367',
        'n02403003', 'n07615774', 'n04501370', 'n03026506', 'n02906734', 'n01770393', 'n04597913', 'n03930313',
        'n04118538', 'n04179913', 'n04311004', 'n02123394', 'n04070727', 'n02793495', 'n02730930', 'n02094433',
        'n04371430', 'n04328186', 'n03649909', 'n04417672', 'n03388043', 'n01774384', 'n02837789', 'n07579787',
        'n04399382', 'n02791270', 'n03089624', 'n02814533', 'n04149813', 'n07747607', 'n03355925', 'n01983481',
        'n04487081', 'n03250847', 'n03255030', 'n02892201', 'n02883205', 'n03100240', 'n02415577', 'n02480495',
        'n01698640', 'n01784675', 'n04376876', 'n03444034', 'n01917289', 'n01950731', 'n03042490', 'n07711569',
        'n04532670', 'n03763968', 'n07768694', 'n02999410', 'n03617480', 'n06596364', 'n01768244', 'n02410509',
        'n03976657', 'n01742172', 'n03980874', 'n02808440', 'n02226429', 'n02231487', 'n02085620', 'n01644900',
        'n02129165', 'n02699494', 'n03837869', 'n02815834', 'n07720875', 'n02788148', 'n02909870', 'n03706229',
        'n07871810', 'n03447447', 'n02113799', 'n12267677', 'n03662601', 'n02841315', 'n07715103', 'n02504458',
    ),
}


_MODES = ("ensemble", "first", "cil")


def templates_for(key: str, mode: str = "ensemble") -> tuple[str, ...]:
    """The prompt templates of template key ``key`` (unknown keys fall back to ``default``).

    ``mode``: "ensemble" = all templates (evaluation), "first" = the first one only (training), "cil" = the
    continual-CLIP template ``"a bad photo of a {}."`` whatever the dataset.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown template mode {mode!r}; expected one of {_MODES}")
    if mode == "cil":
        return (CIL_TEMPLATE,)
    ensemble = TEMPLATES.get(key, TEMPLATES["default"])
    return ensemble[:1] if mode == "first" else ensemble


# Known misspellings in hub copies: the CIFAR-100 loading script (and TFDS's copy) names fine label 26 "cra".
SOURCE_TYPOS: dict[str, dict[str, str]] = {"cifar100": {"cra": "crab"}}


def clean_class_name(name: str) -> str:
    """Readable text for a raw class name: ``"aquarium_fish"`` -> ``"aquarium fish"``,
    ``"/a/apartment_building/outdoor"`` -> ``"apartment building/outdoor"``, ``"AnnualCrop"`` -> ``"Annual Crop"``."""
    s = str(name).strip()
    s = re.sub(r"^/[a-z]/", "", s)  # SUN397 ClassName.txt prefix
    s = s.replace("_", " ")
    if " " not in s and re.search(r"[a-z][A-Z]", s):  # CamelCase folder names
        s = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", s)
    return re.sub(r"\s+", " ", s).strip()


def _norm(name: str) -> str:
    """Comparison key: case, the SUN397 prefix, underscores, slashes and spaces do not matter."""
    s = re.sub(r"^/[a-z]/", "", str(name).strip()).lower()
    return re.sub(r"[\s_/]+", " ", s).strip()


def match_official(key: str, source_names: list[str] | tuple[str, ...]) -> list[int | None] | None:
    """For each source label, the index of the same class in ``CLASS_NAMES[key]`` (None where it has none, e.g.
    Caltech-101's ``BACKGROUND_Google``), matching names after ``_norm``, official or raw (``RAW_NAMES``).

    Returns None when we hold no list for ``key`` or when fewer than half the source names match (the source
    names are then not class names we know, e.g. bare integers). A data loader can use the result to remap a hub
    copy's labels to the official label order.
    """
    official = CLASS_NAMES.get(key)
    if official is None:
        return None
    lookup: dict[str, int] = {}
    for names in (official, RAW_NAMES.get(key, ())):
        for i, n in enumerate(names):
            lookup.setdefault(_norm(n), i)
    found = [lookup.get(_norm(n)) for n in source_names]
    hits = [i for i in found if i is not None]
    if len(hits) < max(1, len(source_names) // 2) or len(set(hits)) != len(hits):
        return None
    return found


def clip_class_names(key: str, source_names: list[str] | tuple[str, ...]) -> list[str]:
    """The class names to put in the prompts for a source whose labels are named ``source_names`` (in the source's
    label order); the result is in the same order and of the same length.

    1. names that match the official list of ``key`` by name get the official text (robust to a hub copy whose
       label order differs from the official one); unmatched ones are cleaned;
    2. else, if we hold an official list of the same length, it is returned as is (the source is assumed to be in
       the official label order: its names are then not comparable, e.g. integers);
    3. else the source names are cleaned (underscores to spaces, SUN397 prefixes dropped, CamelCase split).
    """
    source_names = [SOURCE_TYPOS.get(key, {}).get(str(n), str(n)) for n in source_names]
    official = CLASS_NAMES.get(key)
    found = match_official(key, source_names)
    if official is not None and found is not None:
        return [official[i] if i is not None else clean_class_name(n) for i, n in zip(found, source_names)]
    if official is not None and len(official) == len(source_names):
        return list(official)
    return [clean_class_name(n) for n in source_names]
