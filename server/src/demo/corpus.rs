//! A seeded generator of short, simple English stories: structure that a two-block transformer learns
//! and that reads plainly in a graph. A character is introduced by name and named again later
//! (copying across positions), objects keep their colour and size, quoted speech opens and closes,
//! counting runs `one, two, three`, and plurals agree (`one ball was`, `three balls were`).

use crate::model::synthetic::Rng;

pub const GIRLS: [&str; 16] = [
    "Mia", "Lily", "Anna", "Emma", "Rose", "Lucy", "Sara", "Nora", "Ella", "Zoe", "Amy", "Kate",
    "Ruby", "Ivy", "Jane", "Grace",
];
pub const BOYS: [&str; 16] = [
    "Tom", "Leo", "Max", "Ben", "Sam", "Jack", "Finn", "Owen", "Noah", "Luke", "Adam", "Eli",
    "Hugo", "Oscar", "Paul", "Tim",
];
/// (singular, plural)
const OBJECTS: [(&str, &str); 24] = [
    ("train", "trains"),
    ("cake", "cakes"),
    ("rock", "rocks"),
    ("leaf", "leaves"),
    ("key", "keys"),
    ("sock", "socks"),
    ("spoon", "spoons"),
    ("brush", "brushes"),
    ("ball", "balls"),
    ("box", "boxes"),
    ("hat", "hats"),
    ("kite", "kites"),
    ("cup", "cups"),
    ("book", "books"),
    ("car", "cars"),
    ("boat", "boats"),
    ("bag", "bags"),
    ("doll", "dolls"),
    ("drum", "drums"),
    ("bell", "bells"),
    ("apple", "apples"),
    ("flower", "flowers"),
    ("shell", "shells"),
    ("star", "stars"),
];
const COLOURS: [&str; 10] = [
    "red", "blue", "green", "yellow", "pink", "white", "black", "brown", "purple", "orange",
];
const SIZES: [&str; 6] = ["big", "small", "little", "tiny", "huge", "long"];
const PLACES: [&str; 14] = [
    "park", "garden", "forest", "beach", "house", "school", "farm", "river", "hill", "shop",
    "lake", "zoo", "town", "field",
];
const FEELINGS: [&str; 10] = [
    "happy", "sad", "glad", "tired", "proud", "excited", "calm", "hungry", "sleepy", "kind",
];
/// (singular, plural)
const ANIMALS: [(&str, &str); 10] = [
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("frog", "frogs"),
    ("duck", "ducks"),
    ("fox", "foxes"),
    ("bear", "bears"),
    ("rabbit", "rabbits"),
    ("fish", "fish"),
    ("horse", "horses"),
];
const ANIMAL_DOES: [&str; 6] = [
    "ran away",
    "jumped",
    "sat down",
    "went to sleep",
    "looked up",
    "came back",
];
const NUMBERS: [&str; 10] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];
const TIMES: [&str; 4] = ["One day", "One morning", "Later", "After lunch"];

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

struct Character {
    name: &'static str,
    /// subject, object, possessive pronouns
    pron: [&'static str; 3],
    kind: &'static str,
}

fn character(rng: &mut Rng, not: Option<&str>) -> Character {
    loop {
        let girl = rng.below(2) == 0;
        let name = if girl {
            pick(rng, &GIRLS)
        } else {
            pick(rng, &BOYS)
        };
        if Some(name) == not {
            continue;
        }
        return if girl {
            Character {
                name,
                pron: ["she", "her", "her"],
                kind: "girl",
            }
        } else {
            Character {
                name,
                pron: ["he", "him", "his"],
                kind: "boy",
            }
        };
    }
}

/// One story, a single line of plain text.
pub fn story(rng: &mut Rng) -> String {
    let a = character(rng, None);
    let b = character(rng, Some(a.name));
    let (obj, objs) = pick(rng, &OBJECTS);
    let colour = pick(rng, &COLOURS);
    let size = pick(rng, &SIZES);
    let place = pick(rng, &PLACES);
    let mut s: Vec<String> = Vec::new();
    match rng.below(3) {
        0 => s.push(format!(
            "Once upon a time, there was a {} named {}.",
            a.kind, a.name
        )),
        1 => s.push(format!("There was a little {} named {}.", a.kind, a.name)),
        _ => s.push(format!(
            "{}, a {} named {} went to the {place}.",
            pick(rng, &TIMES),
            a.kind,
            a.name
        )),
    }
    s.push(format!("{} had a {size} {colour} {obj}.", cap(a.pron[0])));
    if rng.below(2) == 0 {
        s.push(format!("{} had a friend named {}.", a.name, b.name));
    } else {
        s.push(format!("{} met a {} named {}.", a.name, b.kind, b.name));
    }
    let n_events = 2 + rng.below(3);
    for _ in 0..n_events {
        match rng.below(10) {
            7 => {
                let (animal, animals) = pick(rng, &ANIMALS);
                let n = rng.below(4);
                if n == 0 {
                    s.push(format!(
                        "{} saw a {} {animal} near the {}.",
                        a.name,
                        pick(rng, &SIZES),
                        pick(rng, &PLACES)
                    ));
                    s.push(format!("The {animal} {}.", pick(rng, &ANIMAL_DOES)));
                } else {
                    s.push(format!(
                        "{} saw {} {animals} near the {}.",
                        a.name,
                        NUMBERS[n],
                        pick(rng, &PLACES)
                    ));
                    s.push(format!("The {animals} {}.", pick(rng, &ANIMAL_DOES)));
                }
            }
            8 => s.push(format!(
                "{} wanted to play with {}, so {} ran to {}.",
                b.name, a.name, b.pron[0], a.pron[1]
            )),
            9 => s.push(format!(
                "{} lost {} {obj}, and {} found it.",
                a.name, a.pron[2], b.name
            )),
            0 => s.push(format!("{} said, \"I like your {colour} {obj}!\"", b.name)),
            1 => s.push(format!("\"Can I play with the {obj}?\" asked {}.", b.name)),
            2 => s.push(format!(
                "{} said, \"Yes, you can play with my {obj}.\"",
                a.name
            )),
            3 => {
                let n = 3 + rng.below(6);
                s.push(format!(
                    "{} counted the {objs}: {}.",
                    b.name,
                    NUMBERS[..n].join(", ")
                ));
            }
            4 => {
                let n = rng.below(6);
                let c2 = pick(rng, &COLOURS);
                if n == 0 {
                    s.push(format!(
                        "There was one {c2} {obj} in the {}.",
                        pick(rng, &PLACES)
                    ));
                    s.push(format!("The {obj} was {}.", pick(rng, &SIZES)));
                } else {
                    s.push(format!(
                        "There were {} {c2} {objs} in the {}.",
                        NUMBERS[n],
                        pick(rng, &PLACES)
                    ));
                    s.push(format!("The {objs} were {}.", pick(rng, &SIZES)));
                }
            }
            5 => s.push(format!(
                "{} took the {colour} {obj} to the {}.",
                a.name,
                pick(rng, &PLACES)
            )),
            _ => s.push(format!("{} gave the {size} {obj} to {}.", a.name, b.name)),
        }
    }
    match rng.below(3) {
        0 => s.push(format!(
            "{} and {} were {}.",
            a.name,
            b.name,
            pick(rng, &FEELINGS)
        )),
        1 => s.push(format!(
            "At the end of the day, {} went home with {} {colour} {obj}.",
            a.name, a.pron[2]
        )),
        _ => s.push(format!(
            "{} was {} and {} was {} too.",
            a.name,
            pick(rng, &FEELINGS),
            b.name,
            pick(rng, &FEELINGS)
        )),
    }
    s.join(" ")
}

/// `n` stories from `seed`; the same arguments always give the same stories.
pub fn stories(seed: u64, n: usize) -> Vec<String> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| story(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stories_are_seeded() {
        assert_eq!(stories(3, 50), stories(3, 50));
        assert_ne!(stories(3, 50), stories(4, 50));
        for s in stories(5, 200) {
            assert_eq!(s.matches('"').count() % 2, 0, "{s}");
            assert!(!s.contains('\n') && !s.contains("  "), "{s}");
        }
    }
}
