"""Paper reproductions in miniature (CPU, seconds to minutes): the CoPG toy bandit, Back-to-Basics RLOO."""
