// Command gorender renders Ollama Modelfile TEMPLATEs the way an Ollama server
// does, so Kiln can compare a dialect's Go template with a model's Jinja chat
// template without an Ollama server.
//
// It is written from the behaviour documented in Kiln's OLLAMA.md (Ollama
// v0.33: template/template.go, server/routes.go, server/prompt.go):
//
//   - the template is parsed by Go's text/template with missingkey=zero and
//     Ollama's functions json, currentDate, yesterdayDate, toTypeScriptType;
//   - chat messages are assembled as /api/chat does: Modelfile MESSAGEs, then
//     the request's messages, with the Modelfile SYSTEM prepended as a system
//     message when the request's first message is not a system message;
//   - consecutive messages of the same role are merged with "\n\n" (tool
//     messages excepted) and .System is every system message joined by "\n\n";
//   - a template that mentions .Messages is executed once with System,
//     Messages, Tools, Response (""), Think, ThinkLevel, IsThinkSet and no
//     Prompt; any other template takes the legacy path (one execution per
//     system/prompt/response group, the last one cut after .Response).
//
// Standard library only (Go 1.19): Kiln builds it on demand with `go build`,
// offline.
//
// Protocol: one JSON object on stdin, {"jobs": [job, ...]}; one JSON object on
// stdout, {"results": [{"render": "..."} | {"error": "..."}, ...]} in job order.
// A job is {"template", "system", "modelfile_messages", "messages", "tools",
// "think", "today"}; see the job type below. Exit status 2 means the input
// itself was unreadable; a template that fails to parse or execute is
// reported in its own result and does not stop the other jobs.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// message mirrors the JSON shape of Ollama's api.Message.
type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	Images     []string   `json:"images,omitempty"`
	ToolCalls  []toolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

type toolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     int            `json:"index,omitempty"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

// tool mirrors Ollama's templateTool (template/template.go): api.Tool as a
// template sees it. The top-level properties are a plain map (Ollama converts
// api.ToolPropertiesMap with ToMap), so `range` and `json` visit them in
// sorted key order; description is not omitempty there.
type tool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description"`
		Parameters  struct {
			Type       string                  `json:"type"`
			Defs       any                     `json:"$defs,omitempty"`
			Items      any                     `json:"items,omitempty"`
			Required   []string                `json:"required,omitempty"`
			Properties map[string]toolProperty `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

// propertyType is a JSON-schema "type": one name or a list of names.
type propertyType []string

func (p *propertyType) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*p = propertyType{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*p = many
	return nil
}

func (p propertyType) MarshalJSON() ([]byte, error) {
	if len(p) == 1 {
		return json.Marshal(p[0])
	}
	return json.Marshal([]string(p))
}

// toolProperty mirrors api.ToolProperty: the same fields in the same order
// (JSON-schema keys it has no field for are dropped when Ollama decodes a
// request, so no template can print them).
type toolProperty struct {
	AnyOf       []toolProperty     `json:"anyOf,omitempty"`
	Type        propertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *toolPropertiesMap `json:"properties,omitempty"`
	Required    []string           `json:"required,omitempty"`
}

// toolPropertiesMap mirrors api.ToolPropertiesMap, the nested properties of
// a property: kept in the request's order (JSON), with a ToMap method that
// templates can range over (sorted, as any Go map).
type toolPropertiesMap struct {
	keys   []string
	values map[string]toolProperty
}

func (t *toolPropertiesMap) ToMap() map[string]toolProperty {
	if t == nil || t.values == nil {
		return nil
	}
	out := make(map[string]toolProperty, len(t.values))
	for k, v := range t.values {
		out[k] = v
	}
	return out
}

func (t *toolPropertiesMap) Len() int {
	if t == nil {
		return 0
	}
	return len(t.keys)
}

func (t toolPropertiesMap) MarshalJSON() ([]byte, error) {
	if t.values == nil {
		return []byte("null"), nil
	}
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range t.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		key, err := json.Marshal(k)
		if err != nil {
			return nil, err
		}
		val, err := json.Marshal(t.values[k])
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteByte(':')
		b.Write(val)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (t *toolPropertiesMap) UnmarshalJSON(data []byte) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return fmt.Errorf("properties must be a JSON object")
	}
	t.keys, t.values = nil, map[string]toolProperty{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		key, _ := tok.(string)
		var value toolProperty
		if err := dec.Decode(&value); err != nil {
			return err
		}
		if _, seen := t.values[key]; !seen {
			t.keys = append(t.keys, key)
		}
		t.values[key] = value
	}
	_, err = dec.Token()
	return err
}

// job is one render request: a TEMPLATE plus what /api/chat would receive.
type job struct {
	Template string `json:"template"`
	// System is the Modelfile SYSTEM ("" when the Modelfile has none).
	System string `json:"system"`
	// ModelfileMessages are the Modelfile MESSAGE lines, in order.
	ModelfileMessages []message `json:"modelfile_messages"`
	// Messages are the chat request's messages.
	Messages []message `json:"messages"`
	// Tools is null when the request carries no tools (then .Tools is nil).
	Tools []tool `json:"tools"`
	// Think is the request's "think": null, true/false, or a level string.
	Think json.RawMessage `json:"think"`
	// Today pins currentDate/yesterdayDate ("2006-01-02"); empty means the clock.
	Today string `json:"today"`
	// ToolTag asks, instead of a render, for the tag Ollama's tool-call
	// parser looks for in the model's output, as it derives it from this
	// template (tools/template.go parseTag).
	ToolTag bool `json:"tool_tag"`
	// ThinkTags asks for the tags Ollama's thinking parser derives from this
	// template (thinking/template.go InferTags), as "opening\nclosing".
	ThinkTags bool `json:"think_tags"`
}

type result struct {
	Render *string `json:"render,omitempty"`
	Error  string  `json:"error,omitempty"`
}

// Values handed to templates. The field names are the ones templates use.
type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

// templateArgs prints as JSON inside a template ({{ .Function.Arguments }}).
type templateArgs map[string]any

func (a templateArgs) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(a))
	return string(b)
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

// templateTools prints as JSON inside a template ({{ .Tools }}).
type templateTools []tool

func (t templateTools) String() string {
	b, _ := json.Marshal([]tool(t))
	return string(b)
}

func funcs(today time.Time) template.FuncMap {
	return template.FuncMap{
		"json": func(v any) string {
			b, _ := json.Marshal(v)
			return string(b)
		},
		// Ollama accepts and ignores a format argument.
		"currentDate": func(args ...string) string {
			return today.Format("2006-01-02")
		},
		"yesterdayDate": func(args ...string) string {
			return today.AddDate(0, 0, -1).Format("2006-01-02")
		},
		"toTypeScriptType": func(v any) string {
			switch p := v.(type) {
			case toolProperty:
				return typeScriptType(p)
			case *toolProperty:
				if p != nil {
					return typeScriptType(*p)
				}
			}
			return "any"
		},
	}
}

// typeScriptType is api.ToolProperty.ToTypeScriptType.
func typeScriptType(p toolProperty) string {
	if len(p.AnyOf) > 0 {
		var types []string
		for _, anyOf := range p.AnyOf {
			types = append(types, typeScriptType(anyOf))
		}
		return strings.Join(types, " | ")
	}
	if len(p.Type) == 0 {
		return "any"
	}
	types := make([]string, 0, len(p.Type))
	for _, t := range p.Type {
		types = append(types, typeScriptName(t))
	}
	return strings.Join(types, " | ")
}

func typeScriptName(jsonType string) string {
	switch jsonType {
	case "string":
		return "string"
	case "number", "integer":
		return "number"
	case "boolean":
		return "boolean"
	case "array":
		return "any[]"
	case "object":
		return "Record<string, any>"
	case "null":
		return "null"
	default:
		return "any"
	}
}

// identifiers lists the field and variable names a template mentions,
// walking the same node kinds Ollama's template.Identifiers walks.
func identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		if n == nil {
			return nil, nil
		}
		for _, c := range n.Nodes {
			got, err := identifiers(c)
			if err != nil {
				return names, err
			}
			names = append(names, got...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.IfNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		return branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				got, err := identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, got...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

func branchIdentifiers(b *parse.BranchNode) ([]string, error) {
	if b.Pipe == nil {
		return nil, errors.New("undefined branch")
	}
	names, err := identifiers(b.Pipe)
	if err != nil {
		return names, err
	}
	for _, l := range []*parse.ListNode{b.List, b.ElseList} {
		if l != nil {
			got, err := identifiers(l)
			if err != nil {
				return names, err
			}
			names = append(names, got...)
		}
	}
	return names, nil
}

// vars is the lower-cased set of names the template (and its {{define}}s) mention.
func vars(t *template.Template) (map[string]bool, error) {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil || tt.Tree.Root == nil {
			continue
		}
		for _, n := range tt.Tree.Root.Nodes {
			names, err := identifiers(n)
			if err != nil {
				return nil, err
			}
			for _, name := range names {
				set[strings.ToLower(name)] = true
			}
		}
	}
	return set, nil
}

// parseTemplate parses s as Ollama does, appending {{ .Response }} to a
// template that mentions neither .Messages nor .Response.
func parseTemplate(s string, today time.Time) (*template.Template, map[string]bool, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs(today)).Parse(s)
	if err != nil {
		return nil, nil, err
	}
	names, err := vars(t)
	if err != nil {
		return nil, nil, err
	}
	if !names["messages"] && !names["response"] {
		tail, err := template.New("").Parse("{{ .Response }}")
		if err != nil {
			return nil, nil, err
		}
		t.Tree.Root.Nodes = append(t.Tree.Root.Nodes, tail.Tree.Root.Nodes...)
	}
	return t, names, nil
}

// chatMessages assembles the message list /api/chat renders: Modelfile
// MESSAGEs then the request's messages, with the Modelfile SYSTEM prepended
// when the request has messages and its first one is not a system message.
func chatMessages(j job) []message {
	msgs := append(append([]message{}, j.ModelfileMessages...), j.Messages...)
	if j.System != "" && len(j.Messages) > 0 && j.Messages[0].Role != "system" {
		msgs = append([]message{{Role: "system", Content: j.System}}, msgs...)
	}
	return msgs
}

// collate joins every system message's content for .System and merges
// consecutive messages of the same role (tool messages excepted).
func collate(msgs []message) (string, []*templateMessage) {
	var system []string
	var out []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
			continue
		}
		tm := &templateMessage{
			Role:       m.Role,
			Content:    m.Content,
			Thinking:   m.Thinking,
			Images:     m.Images,
			ToolName:   m.ToolName,
			ToolCallID: m.ToolCallID,
		}
		for _, tc := range m.ToolCalls {
			tm.ToolCalls = append(tm.ToolCalls, templateToolCall{
				ID: tc.ID,
				Function: templateToolCallFunction{
					Index:     tc.Function.Index,
					Name:      tc.Function.Name,
					Arguments: templateArgs(tc.Function.Arguments),
				},
			})
		}
		out = append(out, tm)
	}
	return strings.Join(system, "\n\n"), out
}

type thinkValue struct {
	set   bool
	on    bool
	level string
}

func parseThink(raw json.RawMessage) (thinkValue, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return thinkValue{}, nil
	}
	var b bool
	if err := json.Unmarshal(raw, &b); err == nil {
		return thinkValue{set: true, on: b}, nil
	}
	var level string
	if err := json.Unmarshal(raw, &level); err != nil {
		return thinkValue{}, fmt.Errorf("think must be null, a boolean or a level string: %s", raw)
	}
	return thinkValue{set: true, on: true, level: level}, nil
}

// cutAfterResponse removes everything after the first {{ .Response }} field
// in the tree (the field itself stays), as Ollama does for the last legacy
// group so a completion continues right where the response starts.
func cutAfterResponse(root *parse.ListNode) *parse.ListNode {
	cut := false
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if cut {
			return nil
		}
		switch t := n.(type) {
		case *parse.FieldNode:
			for _, id := range t.Ident {
				if id == "Response" {
					cut = true
				}
			}
			return t
		case *parse.ListNode:
			var kept []parse.Node
			for _, c := range t.Nodes {
				if k := walk(c); k != nil {
					kept = append(kept, k)
				}
			}
			t.Nodes = kept
			return t
		case *parse.IfNode:
			walkBranch(&t.BranchNode, walk)
			return t
		case *parse.RangeNode:
			walkBranch(&t.BranchNode, walk)
			return t
		case *parse.WithNode:
			walkBranch(&t.BranchNode, walk)
			return t
		case *parse.ActionNode:
			p := walk(t.Pipe)
			if p == nil {
				return nil
			}
			t.Pipe = p.(*parse.PipeNode)
			return t
		case *parse.PipeNode:
			var cmds []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if k := walk(a); k != nil {
						args = append(args, k)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				cmds = append(cmds, c)
			}
			if len(cmds) == 0 {
				return nil
			}
			t.Cmds = cmds
			return t
		}
		return n
	}
	return walk(root).(*parse.ListNode)
}

// walkBranch applies walk to a branch's lists; a list removed whole by the
// cut becomes empty (the body) or absent (the else part).
func walkBranch(b *parse.BranchNode, walk func(parse.Node) parse.Node) {
	if b.List != nil {
		if l, ok := walk(b.List).(*parse.ListNode); ok {
			b.List = l
		} else {
			b.List = &parse.ListNode{NodeType: parse.NodeList}
		}
	}
	if b.ElseList != nil {
		if l, ok := walk(b.ElseList).(*parse.ListNode); ok {
			b.ElseList = l
		} else {
			b.ElseList = nil
		}
	}
}

func render(j job) (string, error) {
	today := time.Now()
	if j.Today != "" {
		d, err := time.Parse("2006-01-02", j.Today)
		if err != nil {
			return "", fmt.Errorf("today must be YYYY-MM-DD: %w", err)
		}
		today = d
	}
	think, err := parseThink(j.Think)
	if err != nil {
		return "", err
	}
	t, names, err := parseTemplate(j.Template, today)
	if err != nil {
		return "", err
	}
	system, msgs := collate(chatMessages(j))

	var out bytes.Buffer
	if names["messages"] {
		var tools templateTools
		if j.Tools != nil {
			tools = templateTools(j.Tools)
		}
		data := map[string]any{
			"System":     system,
			"Messages":   msgs,
			"Tools":      tools,
			"Response":   "",
			"Think":      think.on,
			"ThinkLevel": think.level,
			"IsThinkSet": think.set,
		}
		if err := t.Execute(&out, data); err != nil {
			return "", err
		}
		return out.String(), nil
	}

	// Legacy templates: one execution per (system, prompt, response) group.
	group := func(system, prompt, response string) map[string]any {
		return map[string]any{
			"System":     system,
			"Prompt":     prompt,
			"Response":   response,
			"Think":      think.on,
			"ThinkLevel": think.level,
			"IsThinkSet": think.set,
		}
	}
	var sys, prompt, response string
	flush := func() error {
		if err := t.Execute(&out, group(sys, prompt, response)); err != nil {
			return err
		}
		sys, prompt, response = "", "", ""
		return nil
	}
	for _, m := range msgs {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			sys = m.Content
		case "user":
			if response != "" {
				if err := flush(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}
	last := template.New("").Option("missingkey=zero").Funcs(funcs(today))
	tree := &parse.Tree{Root: cutAfterResponse(t.Tree.Root.CopyList())}
	if _, err := last.AddParseTree("", tree); err != nil {
		return "", err
	}
	if err := last.Execute(&out, group(sys, prompt, response)); err != nil {
		return "", err
	}
	return out.String(), nil
}

// toolTag is Ollama's tools.parseTag: the first non-blank text inside the
// first {{if}} whose condition names .ToolCalls, up to any "{", trimmed; "{"
// when there is none (then only output that starts with a JSON object is
// parsed as a tool call). Only the template's main tree is searched, as
// Ollama does, not its {{define}}s.
func toolTag(j job) (string, error) {
	t, _, err := parseTemplate(j.Template, time.Now())
	if err != nil {
		return "", err
	}
	tc := findToolCallNode(t.Tree.Root.Nodes)
	if tc == nil {
		return "{", nil
	}
	tn := findTextNode(tc.List.Nodes)
	if tn == nil {
		return "{", nil
	}
	tag := strings.ReplaceAll(string(tn.Text), "\r\n", "\n")
	tag, _, _ = strings.Cut(tag, "{")
	tag = strings.TrimSpace(tag)
	if tag == "" {
		tag = "{"
	}
	return tag, nil
}

func findToolCallNode(nodes []parse.Node) *parse.IfNode {
	isToolCalls := func(n *parse.IfNode) bool {
		for _, cmd := range n.Pipe.Cmds {
			for _, arg := range cmd.Args {
				if field, ok := arg.(*parse.FieldNode); ok {
					for _, id := range field.Ident {
						if id == "ToolCalls" {
							return true
						}
					}
				}
			}
		}
		return false
	}
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.IfNode:
			if isToolCalls(n) {
				return n
			}
			if r := findToolCallNode(n.List.Nodes); r != nil {
				return r
			}
			if n.ElseList != nil {
				if r := findToolCallNode(n.ElseList.Nodes); r != nil {
					return r
				}
			}
		case *parse.ListNode:
			if r := findToolCallNode(n.Nodes); r != nil {
				return r
			}
		case *parse.RangeNode:
			if r := findToolCallNode(n.List.Nodes); r != nil {
				return r
			}
			if n.ElseList != nil {
				if r := findToolCallNode(n.ElseList.Nodes); r != nil {
					return r
				}
			}
		case *parse.WithNode:
			if r := findToolCallNode(n.List.Nodes); r != nil {
				return r
			}
			if n.ElseList != nil {
				if r := findToolCallNode(n.ElseList.Nodes); r != nil {
					return r
				}
			}
		}
	}
	return nil
}

func findTextNode(nodes []parse.Node) *parse.TextNode {
	for _, node := range nodes {
		switch n := node.(type) {
		case *parse.TextNode:
			if len(bytes.TrimSpace(n.Text)) == 0 {
				continue
			}
			return n
		case *parse.IfNode:
			return firstText(n.List, n.ElseList)
		case *parse.ListNode:
			if text := findTextNode(n.Nodes); text != nil {
				return text
			}
		case *parse.RangeNode:
			return firstText(n.List, n.ElseList)
		case *parse.WithNode:
			return firstText(n.List, n.ElseList)
		case *parse.ActionNode:
			return nil
		}
	}
	return nil
}

// firstText searches a branch's body, then its else part, and stops there.
func firstText(list, elseList *parse.ListNode) *parse.TextNode {
	if text := findTextNode(list.Nodes); text != nil {
		return text
	}
	if elseList != nil {
		return findTextNode(elseList.Nodes)
	}
	return nil
}

// thinkTags is Ollama's thinking.InferTags: at each {{ .Thinking }} inside a
// range over .Messages, the first and last text of the nearest enclosing
// list, trimmed (the last such field wins); empty when there is none, and
// then Ollama does not split thinking out of a reply.
func thinkTags(j job) (string, error) {
	t, _, err := parseTemplate(j.Template, time.Now())
	if err != nil {
		return "", err
	}
	var ancestors []parse.Node
	opening, closing := "", ""
	enter := func(n parse.Node) bool {
		ancestors = append(ancestors, n)
		f, ok := n.(*parse.FieldNode)
		if !ok || len(f.Ident) == 0 || f.Ident[0] != "Thinking" {
			return true
		}
		var rng *parse.RangeNode
		for i := len(ancestors) - 1; i >= 0; i-- {
			if r, ok := ancestors[i].(*parse.RangeNode); ok {
				rng = r
				break
			}
		}
		if rng == nil || !rangeUsesField(rng, "Messages") {
			return true
		}
		for i := len(ancestors) - 1; i >= 0; i-- {
			if l, ok := ancestors[i].(*parse.ListNode); ok {
				if t, ok := l.Nodes[0].(*parse.TextNode); ok {
					opening = strings.TrimSpace(t.String())
				}
				if t, ok := l.Nodes[len(l.Nodes)-1].(*parse.TextNode); ok {
					closing = strings.TrimSpace(t.String())
				}
				break
			}
		}
		return true
	}
	exit := func(parse.Node) { ancestors = ancestors[:len(ancestors)-1] }
	visit(t.Tree.Root, enter, exit)
	return opening + "\n" + closing, nil
}

func rangeUsesField(r *parse.RangeNode, field string) bool {
	found := false
	visit(r.BranchNode.Pipe, func(n parse.Node) bool {
		if f, ok := n.(*parse.FieldNode); ok && f.Ident[0] == field {
			found = true
		}
		return true
	}, nil)
	return found
}

// visit walks a template tree as Ollama's thinking.templateVisit does.
func visit(n parse.Node, enter func(parse.Node) bool, exit func(parse.Node)) {
	if n == nil {
		return
	}
	if !enter(n) {
		return
	}
	switch x := n.(type) {
	case *parse.ListNode:
		for _, c := range x.Nodes {
			visit(c, enter, exit)
		}
	case *parse.BranchNode:
		if x.Pipe != nil {
			visit(x.Pipe, enter, exit)
		}
		if x.List != nil {
			visit(x.List, enter, exit)
		}
		if x.ElseList != nil {
			visit(x.ElseList, enter, exit)
		}
	case *parse.ActionNode:
		visit(x.Pipe, enter, exit)
	case *parse.WithNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.RangeNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.IfNode:
		visit(&x.BranchNode, enter, exit)
	case *parse.TemplateNode:
		visit(x.Pipe, enter, exit)
	case *parse.PipeNode:
		for _, c := range x.Cmds {
			visit(c, enter, exit)
		}
	case *parse.CommandNode:
		for _, a := range x.Args {
			visit(a, enter, exit)
		}
	}
	if exit != nil {
		exit(n)
	}
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "gorender: reading stdin:", err)
		os.Exit(2)
	}
	var in struct {
		Jobs []job `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &in); err != nil {
		fmt.Fprintln(os.Stderr, "gorender: stdin is not a {\"jobs\": [...]} object:", err)
		os.Exit(2)
	}
	results := make([]result, len(in.Jobs))
	for i, j := range in.Jobs {
		render := render
		if j.ToolTag {
			render = toolTag
		} else if j.ThinkTags {
			render = thinkTags
		}
		text, err := render(j)
		if err != nil {
			results[i] = result{Error: err.Error()}
			continue
		}
		results[i] = result{Render: &text}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]any{"results": results}); err != nil {
		fmt.Fprintln(os.Stderr, "gorender: writing stdout:", err)
		os.Exit(2)
	}
}
