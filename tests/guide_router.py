"""The router file of docs/adding_a_router.md, read from the page: `write_guide_router(folder)` saves it as the
guide says a user would, to be named in ROUTER_FILES. tests/test_adding_a_router.py runs the suite with it."""
import os
import re

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'adding_a_router.md')


def guide_block(marker):
    """The code block that follows the HTML comment `<!-- marker: ... -->` on the page."""
    with open(GUIDE) as f:
        text = f.read()
    match = re.search(rf'<!-- {marker}:[^>]*-->\s*```python\n(.*?)```', text, re.S)
    assert match, f'docs/adding_a_router.md has no code block after <!-- {marker}: ... -->'
    return match.group(1)


def guide_router_name():
    """The name the page's router registers under (the first argument of its @register_router)."""
    return re.search(r"@register_router\('(\w+)'", guide_block('router file')).group(1)


def write_guide_router(folder):
    """The page's router file, written to `folder`; returns its path."""
    path = os.path.join(folder, f'{guide_router_name()}.py')
    with open(path, 'w') as f:
        f.write(guide_block('router file'))
    return path
