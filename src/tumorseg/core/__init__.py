"""What every stage shares: errors (:mod:`.errors`), label conventions and regions
(:mod:`.labels`), the console and argument errors (:mod:`.console`), all-or-nothing file
output (:mod:`.files`) and phase timing (:mod:`.timing`).

Imports no other ``tumorseg`` package.
"""
