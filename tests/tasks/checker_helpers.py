"""User-style checker functions for the ``py:module:function`` checker tests."""


def exact_match(completion: str, answer: str) -> bool:
    return completion.strip() == answer.strip()


def partial_credit(completion: str, answer: str) -> float:
    return 0.5 if answer in completion else 0.0


def picky(completion: str, answer: str) -> float:
    return float(int(completion) == int(answer))  # raises on garbage


def bad_return(completion: str, answer: str):
    return "yes"


NOT_CALLABLE = 3
