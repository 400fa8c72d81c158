"""The smallest sprocket worker: echoes a greeting.

python examples/hello_world.py            # HTTP mode on :8000, POST /generate {"name": "Ada"}
python examples/hello_world.py --queue    # take jobs from the queue at TOGETHER_API_BASE_URL
"""

from typing import Any

import sprocket


class HelloWorld(sprocket.Sprocket):
    def setup(self) -> None:
        self.greeting = "Hello"

    def predict(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"message": f"{self.greeting}, {args.get('name', 'world')}!"}


if __name__ == "__main__":
    sprocket.run(HelloWorld(), "hello-world")
